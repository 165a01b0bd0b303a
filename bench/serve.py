"""Serving on CPU: our serve.py against `transformers serve --continuous-batching`, batch-1 decode against
transformers' `generate`, and LSA against dense decode per token at long context.

One run, one machine, float32 arithmetic everywhere:

  folder     a Hugging Face folder written by our code: a random-weight LongCat-Flash-layout model (the
             `small` preset's dimensions with no N-gram, indexer or MTP, which transformers'
             LongcatFlashForCausalLM lacks; about 83M parameters) with its weights in bfloat16, as LongCat
             checkpoints ship (transformers loads them as float32, `--dtype float32`: the same values; ours
             keeps them in bfloat16 and computes in float32, serve.py's default on CPU), a byte-level BPE
             trained on the Python standard library (`training.data.train_bpe`) and the default chat template
             (`serving.text.save_tokenizer_folder`). Both servers load this same folder.
  serving    both servers started (ours: `python serve.py --hf FOLDER`; theirs: `transformers serve FOLDER
             --continuous-batching --device cpu --dtype float32`), each on a free localhost port, then level
             by level one side after the other (which goes first alternates between levels; the idle
             server takes no CPU), so that the two sides' measurements of a level are minutes apart at most
             on a machine whose load drifts over a run. Each side is driven by the
             official `openai` client (AsyncOpenAI): streaming chat completions, greedy, exactly --max-tokens
             output tokens (ours: `ignore_eos`; transformers: `generation_config={"eos_token_id": -1}`,
             which its continuous batching reads as "no EOS"), prompts from distinct stdlib snippets of
             50-200 tokens (no two requests share a prompt, so no prefix cache helps either side). Per
             concurrency level: an untimed warm-up wave (one request, then `concurrency` requests at once, so
             that each server has compiled / allocated for that batch size), then the timed requests,
             concurrency-limited. Output tokens are the server's own `usage.completion_tokens`.
             Metrics: output tokens/s (all output tokens / wall time of the level), time to first token
             (first non-empty content chunk), time per output token ((last chunk - first chunk) /
             (tokens - 1) per request), medians and p99.
  decode     batch 1 in this process: our `Engine.generate` (paged cache, one request) against
             `LongcatFlashForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)`, both on the
             folder, warmed up; the decode time per token is (time of 64 tokens - time of 1 token) / 63, so
             prefill and the first token are left out. Greedy outputs of the two are compared as a check.
  lsa        one decode step of `model.longcat.paged_step` (jit, batch 1, one new token) for the `small`
             preset (indexer with SI, CLI and HI) against its dense twin (no indexer), over a paged cache
             whose rows hold random values: decode time does not depend on what the rows hold, and prefilling
             32K tokens on this CPU would take far too long. Median of --lsa-steps steps after warm-up.

`transformers serve` always loads with a device_map, which needs the accelerate package, which the locked
test environment leaves out: `pip install -e '.[bench]'` adds it, or, without touching the venv,
`pip install --target DIR --no-deps accelerate` and `--transformers-pythonpath DIR` (only that server's
PYTHONPATH gets it). Decode and LSA sides are timed
interleaved (A, B, A, B...), so load from other users of a shared machine hits them alike.

Usage:
  python bench/serve.py [--quick] [--skip-transformers-serve] [--workdir DIR] [--out PATH.json]
                        [--transformers-pythonpath DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lsa_decode import bench_lsa  # noqa: E402
from serve_load import Server, drive, free_port  # noqa: E402
from serve_report import print_summary, save_png, summarize  # noqa: E402

import longcat_jax as lj  # noqa: E402
from longcat_jax.training import data  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "serve_cpu.json")
MODEL_NAME = "bench-flash"  # what ours serves the folder as (--served-model-name)
SPECIALS = ("<s>", "</s>", "<pad>", "<|")  # snippets holding these would change the chat template's tokens


# --- The folder -------------------------------------------------------------------------------------------


def flash_config(vocab_size: int, quick: bool) -> lj.Config:
    """The small preset's dimensions in the Flash layout: no N-gram, indexer or MTP. HF's MLA latent norms use
    eps 1e-6 (docs/architecture.md#rmsnorm); ours follows, so both sides compute the same function."""
    return lj.Config.small(vocab_size=vocab_size, ngram_n=0, use_indexer=False, si_enabled=False,
                           hi_enabled=False, mtp_num_steps=0, param_dtype="bfloat16", dtype="float32",
                           mla_norm_eps=1e-6, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, **(dict(num_layers=2) if quick else {}))


def stdlib_texts(max_chars: int) -> list[str]:
    texts, n = [], 0
    for path in data.stdlib_files():
        try:
            texts += data.read_text_files([path])
        except ValueError:
            continue
        n += len(texts[-1])
        if n >= max_chars:
            break
    return texts


def make_folder(folder: str, vocab: int, quick: bool) -> dict:
    """Trains the BPE, builds and saves the model and tokenizer; returns what it made."""
    from longcat_jax.serving.text import save_tokenizer_folder

    t = time.perf_counter()
    bpe = data.train_bpe(stdlib_texts(1_000_000 if quick else 4_000_000), vocab)
    bpe_s = time.perf_counter() - t
    tok_vocab = bpe.get_vocab_size()
    ids = {name: bpe.token_to_id(name) for name in ("<pad>", "<s>", "</s>")}
    cfg = flash_config(-(-tok_vocab // 128) * 128, quick)
    if not (cfg.vocab_size >= tok_vocab and ids["<s>"] == cfg.bos_token_id and ids["</s>"] == cfg.eos_token_id
            and ids["<pad>"] == cfg.pad_token_id):
        raise AssertionError(f"config and tokenizer disagree: {cfg.vocab_size=} {tok_vocab=} {ids=}")
    t = time.perf_counter()
    model = lj.build_model(cfg, seed=0)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    lj.save_hf(model, folder)
    save_tokenizer_folder(bpe, folder)
    from flax import nnx

    params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))
    info = dict(folder=folder, params=params, tokenizer_vocab=tok_vocab, config_vocab=cfg.vocab_size,
                special_ids=ids, bpe_train_s=bpe_s, build_and_save_s=time.perf_counter() - t,
                config={k: getattr(cfg, k) for k in (
                    "vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
                    "expert_ffn_hidden_size", "n_routed_experts", "zero_expert_num", "moe_topk")})
    print(f"folder {folder}: LongCat-Flash layout, {params:,} parameters ({params / 1e6:.1f}M), "
          f"{cfg.num_layers} layers, BPE vocabulary {tok_vocab} (config {cfg.vocab_size})", flush=True)
    return info


def make_prompts(tokenizer, count: int, seed: int = 0, lo: int = 50, hi: int = 200) -> list[str]:
    """`count` distinct stdlib snippets of lo..hi tokens (decoded back to text)."""
    rng = np.random.default_rng(seed)
    paths = data.stdlib_files()
    prompts: list[str] = []
    while len(prompts) < count:
        try:
            (text,) = data.read_text_files([paths[rng.integers(len(paths))]])
        except ValueError:
            continue
        if len(text) < 4000:
            continue
        start = int(rng.integers(0, len(text) - 3000))
        ids = tokenizer.encode(text[start:start + 3000]).ids
        n = int(rng.integers(lo, hi + 1))
        snippet = tokenizer.decode(ids[:n])
        if any(s in snippet for s in SPECIALS) or not snippet.strip() or snippet in prompts:
            continue
        prompts.append(snippet)
    return prompts


# --- Servers ----------------------------------------------------------------------------------------------


def bench_servers(args, folder: str, prompts: list[str], result: dict, save) -> None:
    levels = [1, 8] if args.quick else [1, 8, 32]
    levels = [int(x) for x in args.levels.split(",")] if args.levels else levels
    n_requests = (lambda c: max(2, c)) if args.quick else (lambda c: max(4, 2 * c))
    needed = sum(1 + c + n_requests(c) for c in levels)
    if len(prompts) < needed:
        raise AssertionError(f"{len(prompts)} prompts for {needed} requests")
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    max_len = str(args.max_model_len)
    sides = {
        "ours": dict(
            cmd=[sys.executable, os.path.join(ROOT, "serve.py"), "--hf", folder, "--host", "127.0.0.1",
                 "--port", "{port}", "--max-num-seqs", "32", "--max-model-len", max_len,
                 "--served-model-name", MODEL_NAME, "--log-level", "info"],
            model=MODEL_NAME, extra={"ignore_eos": True}),
        "transformers": dict(
            cmd=[os.path.join(bin_dir, "transformers"), "serve", folder, "--continuous-batching",
                 "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", "{port}",
                 "--max-model-len", max_len],
            model=folder, extra={"generation_config": json.dumps({"eos_token_id": -1})}),
    }
    if args.skip_transformers_serve:
        del sides["transformers"]
    result["serving"] = dict(levels=levels, requests_per_level={c: n_requests(c) for c in levels},
                             max_tokens=args.max_tokens, max_model_len=args.max_model_len, order=[])
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, side in sides.items():
            server = start_server(stack, name, side, env, args, result)
            if server is not None:
                servers[name] = server
            save()
        # Level by level, the sides one after the other (the first side alternating), so that the two
        # measurements of a level lie minutes apart at most: the load of a shared machine drifts over a run.
        # Each server idles (no CPU) while the other is driven.
        used = 0
        for i, c in enumerate(levels):
            n = n_requests(c)
            warm, timed = prompts[used:used + 1 + c], prompts[used + 1 + c:used + 1 + c + n]
            used += 1 + c + n
            for name in (list(servers) if i % 2 == 0 else list(servers)[::-1]):
                server, entry = servers[name], result["serving"][name]
                if "error" in entry:
                    continue
                result["serving"]["order"].append(f"{name}@{c}")
                try:
                    entry["levels"].append(asyncio.run(drive(
                        server, sides[name]["model"], c, warm, timed, args.max_tokens, sides[name]["extra"],
                        functools.partial(compiled_programs, server) if name == "ours" else None)))
                except (RuntimeError, TimeoutError, OSError) as e:  # one server failing leaves the rest
                    print(f"[{name}] failed: {e}", flush=True)
                    entry["error"] = str(e)[-3000:]
                if name == "ours":
                    entry["programs_compiled_total"] = len(compiled_programs(server))
                entry["log_tail"] = server.tail(15).splitlines()
                save()


def compiled_programs(server) -> list[str]:
    """Our server's log lines for each step program it compiled on demand (not ahead of traffic)."""
    lines = server.log_text().splitlines()
    return [line.split(": ", 1)[-1] for line in lines if "compiling the step for" in line]


def start_server(stack, name: str, side: dict, env: dict, args, result: dict):
    """Start one side's server inside stack (stopped when the run ends); None, with the reason recorded in
    result["serving"][name], when it cannot start."""
    port = free_port()
    cmd = [x.replace("{port}", str(port)) for x in side["cmd"]]
    log_path = os.path.join(args.workdir, f"server_{name}.log")
    side_env = dict(env)
    if name == "transformers":
        if args.transformers_pythonpath:
            side_env["PYTHONPATH"] = os.pathsep.join(
                [args.transformers_pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        # `transformers serve` always loads with a device_map, which needs accelerate.
        probe = subprocess.run([sys.executable, "-c", "import accelerate"], env=side_env, capture_output=True)
        if probe.returncode != 0:
            msg = ("transformers serve needs the accelerate package (it always loads with a device_map): "
                   "pip install accelerate, or pass --transformers-pythonpath DIR holding it")
            print(f"[{name}] skipped: {msg}", flush=True)
            result["serving"][name] = dict(command=cmd, error=msg)
            return None
    try:
        server = stack.enter_context(Server(name, cmd, side_env, log_path, port, args.server_timeout))
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"[{name}] failed: {e}", flush=True)
        result["serving"][name] = dict(command=cmd, error=str(e)[-3000:])
        return None
    result["serving"][name] = dict(command=cmd, startup_s=server.startup_s, levels=[])
    return server


# --- Batch-1 decode ---------------------------------------------------------------------------------------


def bench_decode(args, folder: str, prompt_ids: list[int], result: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from longcat_jax.serving.engine import Engine, EngineSettings
    from longcat_jax.serving.load import load_for_serving
    from longcat_jax.serving.params import SamplingParams

    n, reps = args.max_tokens, args.decode_reps
    torch.set_num_threads(os.cpu_count())

    # Ours, loaded from the folder as serve.py loads it (bfloat16 weights, float32 compute).
    cfg, model, _, _ = load_for_serving(hf=folder)
    engine = Engine(model, EngineSettings(max_num_seqs=1, max_model_len=args.max_model_len))

    def ours(k):
        t = time.perf_counter()
        g = engine.generate([prompt_ids], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))[0]
        dt = time.perf_counter() - t
        assert len(g.token_ids) == k, (len(g.token_ids), g.finish_reason, g.error)
        return dt, g.token_ids

    x = torch.tensor([prompt_ids])

    def theirs(dtype):
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

        def run(k):
            t = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                   do_sample=False, pad_token_id=cfg.pad_token_id)
            dt = time.perf_counter() - t
            new = out[0, x.shape[1]:].tolist()
            assert len(new) == k, len(new)
            return dt, new

        return run, ref.config._attn_implementation

    # transformers in float32 (the comparison) and in the folder's bfloat16, its other choice (slower on a
    # CPU without bfloat16 arithmetic: the speedup is taken against the faster of the two).
    (f32, attn), (bf16, _) = theirs(torch.float32), theirs(torch.bfloat16)
    sides = {"ours": ours, "transformers": f32, "transformers_bfloat16": bf16}
    # Warm-up: ours twice each (the second run of a prompt reuses its cached pages: a shorter prefill,
    # another program), theirs once each. Then the timed runs interleaved, so load from other users of a
    # shared machine hits every side alike.
    for k in (n, 1, n, 1):
        ours(k)
    for k in (n, 1):
        f32(k), bf16(k)
    times = {name: {n: [], 1: []} for name in sides}
    last_ids = {}
    for _ in range(reps):
        for k in (n, 1):
            for name, fn in sides.items():
                dt, ids = fn(k)
                times[name][k].append(dt)
                if k == n:
                    last_ids[name] = ids
    a, b = last_ids["ours"], last_ids["transformers"]
    agree = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))

    def summary(times):
        full, one = statistics.median(times[n]), statistics.median(times[1])
        per_token = (full - one) / (n - 1)
        return dict(time_full_s=times[n], time_one_token_s=times[1], median_full_s=full, median_one_s=one,
                    decode_s_per_token=per_token, decode_tokens_per_s=1 / per_token)

    result["decode_batch1"] = dict(
        prompt_tokens=len(prompt_ids), new_tokens=n, reps=reps,
        method=f"(median time of {n} tokens - median time of 1 token) / {n - 1}, after warm-up, sides "
               "interleaved",
        ours=dict(summary(times["ours"]), api="serving.engine.Engine.generate, max_num_seqs=1"),
        transformers=dict(summary(times["transformers"]),
                          api="LongcatFlashForCausalLM.generate(do_sample=False, "
                              "min_new_tokens=max_new_tokens), float32",
                          torch_threads=torch.get_num_threads(), attn_implementation=attn),
        transformers_bfloat16=dict(summary(times["transformers_bfloat16"]), api="the same in bfloat16"),
        greedy_tokens_agreeing_from_start=agree)
    r = result["decode_batch1"]
    best = min(r[side]["decode_s_per_token"] for side in ("transformers", "transformers_bfloat16"))
    r["speedup"] = best / r["ours"]["decode_s_per_token"]
    r["speedup_against"] = "the faster of transformers in float32 and in bfloat16"
    print(f"decode batch 1: ours {r['ours']['decode_tokens_per_s']:.1f} tok/s, transformers "
          f"{r['transformers']['decode_tokens_per_s']:.1f} tok/s in float32, "
          f"{r['transformers_bfloat16']['decode_tokens_per_s']:.1f} in bfloat16 ({r['speedup']:.2f}x); "
          f"greedy outputs agree on the first {agree} of {n} tokens", flush=True)


# --- Run ----------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return dict(cpu_model=cpu, cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
                torch=torch.__version__, transformers=transformers.__version__,
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                loadavg_start=os.getloadavg())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="end-to-end check in a few minutes: 2-layer model, 1 and 8 streams, few requests, "
                        "LSA at 4K only")
    p.add_argument("--skip-transformers-serve", action="store_true", help="serve ours only")
    p.add_argument("--skip-serving", action="store_true", help="no servers at all")
    p.add_argument("--skip-decode", action="store_true", help="no batch-1 decode comparison")
    p.add_argument("--skip-lsa", action="store_true", help="no LSA vs dense decode")
    p.add_argument("--workdir", default=None,
                   help="where the HF folder and server logs go (default: a temp dir, removed at the end)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result JSON; the PNG goes beside it ('' to skip both)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary")
    p.add_argument("--levels", default="", help="concurrency levels, e.g. 1,8,32 (default by mode)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--max-model-len", type=int, default=512, help="both servers' --max-model-len")
    p.add_argument("--transformers-pythonpath", default=os.environ.get("BENCH_TRANSFORMERS_PYTHONPATH", ""),
                   help="prepended to PYTHONPATH of `transformers serve` only (e.g. a `pip install --target "
                        "DIR accelerate`, which it needs, without touching the venv)")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for a server's /health")
    p.add_argument("--decode-reps", type=int, default=3, help="timed generate pairs per side (batch 1)")
    p.add_argument("--lsa-contexts", default="", help="e.g. 4096,16384,32768 (default by mode)")
    p.add_argument("--lsa-variants", default="lsa_xla,lsa_reference,lsa_xla_no_hi,dense",
                   help="of lsa_xla, lsa_reference, lsa_xla_no_hi, dense")
    p.add_argument("--lsa-steps", type=int, default=None, help="timed decode steps (default 10, quick 3)")
    p.add_argument("--lsa-warmup", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16, help="paged cache page size of the LSA part")
    p.add_argument("--lsa-baseline-context", type=int, default=256,
                   help="also time this short context: the step's cost that does not grow with the context "
                        "(0: no)")
    a = p.parse_args(argv)
    if a.lsa_steps is None:
        a.lsa_steps = 3 if a.quick else 10
    if a.max_tokens < 2:
        p.error("--max-tokens must be >= 2")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a timeout around this script) unwinds like Ctrl-C: the servers' process groups are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    temp = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_serve_"))
    os.makedirs(args.workdir, exist_ok=True)
    folder = os.path.join(args.workdir, "longcat-flash-bench")
    result = dict(machine=machine_info(),
                  command=" ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
                  settings={k: v for k, v in vars(args).items()})
    png = os.path.splitext(args.out)[0] + ".png" if args.out else ""

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)

    try:
        result["folder"] = make_folder(folder, args.vocab, args.quick)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        prompts = make_prompts(tok, 200)
        save()
        if not args.skip_serving:
            bench_servers(args, folder, prompts, result, save)
        if not args.skip_decode:
            bench_decode(args, folder, tok.encode(prompts[-1]).ids[:128], result)
            save()
        if not args.skip_lsa:
            bench_lsa(args, result, save)
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["wall_s"] = time.perf_counter() - t_start
        result["summary"] = summarize(result)
        save()
        if temp:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print_summary(result)
    print(f"\nwall time {result['wall_s']:.0f} s")
    if args.out:
        save_png(result, png)
        print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
