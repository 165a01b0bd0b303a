"""Serving on CPU: our serve.py against `transformers serve --continuous-batching`, batch-1 decode against
transformers' `generate`, and LSA against dense decode per token at long context.

One run, one machine, float32 everywhere:

  folder     a Hugging Face folder written by our code: a random-weight LongCat-Flash-layout model (the
             `small` preset's dimensions with no N-gram, indexer or MTP, which transformers'
             LongcatFlashForCausalLM lacks; about 83M parameters), a byte-level BPE trained on the Python
             standard library (`training.data.train_bpe`) and the default chat template
             (`serving.text.save_tokenizer_folder`). Both servers load this same folder.
  serving    each server in turn (ours: `python serve.py --hf FOLDER`; theirs: `transformers serve FOLDER
             --continuous-batching --device cpu --dtype float32`), on a free localhost port, driven by the
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
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
                           hi_enabled=False, mtp_num_steps=0, mla_norm_eps=1e-6, bos_token_id=1,
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own process group: started, polled for readiness, stopped (SIGTERM, then
    SIGKILL) on exit, errors included."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: str, port: int, timeout: float):
        self.name, self.cmd, self.env, self.log_path, self.port = name, cmd, env, log_path, port
        self.timeout, self.proc, self.url = timeout, None, f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.log = open(self.log_path, "w")
        print(f"[{self.name}] {' '.join(self.cmd)}  (log {self.log_path})", flush=True)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   + self.tail())
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    ok = r.status == 200
                if ok:
                    self.startup_s = time.perf_counter() - self.t0
                    print(f"[{self.name}] ready after {self.startup_s:.1f} s", flush=True)
                    return
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {self.timeout:.0f} s:\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __exit__(self, *exc):
        self.stop()


async def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    times, usage, finish = [], None, None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                times.append(now)
            if choice.finish_reason:
                finish = choice.finish_reason
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(times)
    return dict(start=t0, end=end, tokens=tokens, chunks=len(times), finish=finish,
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
                ttft=times[0] - t0 if times else None,
                tpot=(times[-1] - times[0]) / (tokens - 1) if len(times) >= 2 and tokens > 1 else None)


async def run_wave(client, model, prompts, concurrency, max_tokens, extra) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p):
        async with sem:
            return await one_request(client, model, p, max_tokens, extra)

    t = time.perf_counter()
    out = await asyncio.gather(*(guarded(p) for p in prompts), return_exceptions=True)
    return out, time.perf_counter() - t


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def level_stats(results, wall: float, concurrency: int) -> dict:
    ok = [r for r in results if isinstance(r, dict)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if not isinstance(r, dict)]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    toks = [r["tokens"] for r in ok]
    return dict(concurrency=concurrency, requests=len(results), errors=errors, wall_s=wall,
                output_tokens=sum(toks), output_tokens_per_s=sum(toks) / wall,
                output_tokens_per_request=dict(min=min(toks, default=0), max=max(toks, default=0)),
                content_chunks_per_request=statistics.median([r["chunks"] for r in ok]) if ok else None,
                prompt_tokens_mean=statistics.mean(r["prompt_tokens"] for r in ok if r["prompt_tokens"])
                if ok and ok[0]["prompt_tokens"] else None,
                finish_reasons=sorted({str(r["finish"]) for r in ok}),
                ttft_median_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
                tpot_median_s=pct(tpot, 50), tpot_p99_s=pct(tpot, 99))


async def drive(server: Server, model: str, levels, prompts, n_requests, max_tokens, extra,
                count_compiles=None) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800)
    rows, used = [], 0
    try:
        for c in levels:
            n = n_requests(c)
            warm = prompts[used:used + 1 + c]
            timed = prompts[used + 1 + c:used + 1 + c + n]
            used += 1 + c + n
            t = time.perf_counter()
            await run_wave(client, model, warm[:1], 1, max_tokens, extra)
            out, _ = await run_wave(client, model, warm[1:], c, max_tokens, extra)
            bad = [r for r in out if not isinstance(r, dict)]
            if bad:
                raise RuntimeError(f"{server.name}: warm-up request failed: {bad[0]!r}")
            warm_s = time.perf_counter() - t
            before = len(count_compiles()) if count_compiles else None
            out, wall = await run_wave(client, model, timed, c, max_tokens, extra)
            row = level_stats(out, wall, c)
            row["warmup_s"] = warm_s
            if count_compiles:
                new = count_compiles()[before:]
                row["programs_compiled_during_timed_requests"] = len(new)
                row["programs_compiled_during_timed_requests_log"] = new
            rows.append(row)
            print(f"[{server.name}] {c:3d} streams x {n:3d} requests: "
                  f"{row['output_tokens_per_s']:8.1f} tok/s, "
                  f"TTFT median {fmt_ms(row['ttft_median_s'])} p99 {fmt_ms(row['ttft_p99_s'])}, "
                  f"TPOT median {fmt_ms(row['tpot_median_s'])} p99 {fmt_ms(row['tpot_p99_s'])}, "
                  f"tokens/request {row['output_tokens_per_request']}, errors {len(row['errors'])}, "
                  f"warm-up {warm_s:.1f} s"
                  + (f", programs compiled while timed {row['programs_compiled_during_timed_requests']}"
                     if count_compiles else ""), flush=True)
    finally:
        await client.close()
    return rows


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.0f} ms"


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
                             max_tokens=args.max_tokens, max_model_len=args.max_model_len)
    for name, side in sides.items():
        port = free_port()
        cmd = [x.replace("{port}", str(port)) for x in side["cmd"]]
        log_path = os.path.join(args.workdir, f"server_{name}.log")
        side_env = dict(env)
        if name == "transformers":
            if args.transformers_pythonpath:
                side_env["PYTHONPATH"] = os.pathsep.join(
                    [args.transformers_pythonpath, *filter(None, [env.get("PYTHONPATH")])])
            # `transformers serve` always loads with a device_map, which needs accelerate.
            probe = subprocess.run([sys.executable, "-c", "import accelerate"], env=side_env,
                                   capture_output=True)
            if probe.returncode != 0:
                msg = ("transformers serve needs the accelerate package (it always loads with a device_map): "
                       "pip install accelerate, or pass --transformers-pythonpath DIR holding it")
                print(f"[{name}] skipped: {msg}", flush=True)
                result["serving"][name] = dict(command=cmd, error=msg)
                save()
                continue
        try:
            with Server(name, cmd, side_env, log_path, port, args.server_timeout) as server:
                def compiles(server=server):
                    return [line.split(": ", 1)[-1] for line in server.log_text().splitlines()
                            if "compiling the step for" in line]

                rows = asyncio.run(drive(server, side["model"], levels, prompts, n_requests, args.max_tokens,
                                         side["extra"], compiles if name == "ours" else None))
                result["serving"][name] = dict(command=cmd, startup_s=server.startup_s, levels=rows,
                                               log_tail=server.tail(15).splitlines())
                if name == "ours":
                    result["serving"][name]["programs_compiled_total"] = len(compiles())
        except (RuntimeError, TimeoutError, OSError) as e:  # one server failing leaves the rest of the run
            print(f"[{name}] failed: {e}", flush=True)
            result["serving"][name] = dict(command=cmd, error=str(e)[-3000:])
        save()


# --- Batch-1 decode ---------------------------------------------------------------------------------------


def bench_decode(args, folder: str, prompt_ids: list[int], result: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from longcat_jax.serving.engine import Engine, EngineSettings
    from longcat_jax.serving.params import SamplingParams

    n, reps = args.max_tokens, args.decode_reps
    torch.set_num_threads(os.cpu_count())

    # Ours, loaded from the folder as serve.py loads it.
    cfg, model = lj.load_hf(folder)
    engine = Engine(model, EngineSettings(max_num_seqs=1, max_model_len=args.max_model_len))

    def ours(k):
        t = time.perf_counter()
        g = engine.generate([prompt_ids], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))[0]
        dt = time.perf_counter() - t
        assert len(g.token_ids) == k, (len(g.token_ids), g.finish_reason, g.error)
        return dt, g.token_ids

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids])

    def theirs(k):
        t = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                               do_sample=False, pad_token_id=cfg.pad_token_id)
        dt = time.perf_counter() - t
        new = out[0, x.shape[1]:].tolist()
        assert len(new) == k, len(new)
        return dt, new

    # Warm-up: ours twice each (the second run of a prompt reuses its cached pages: a shorter prefill,
    # another program), theirs once each. Then the timed runs interleaved, so load from other users of a
    # shared machine hits both sides alike.
    for k in (n, 1, n, 1):
        ours(k)
    for k in (n, 1):
        theirs(k)
    sides = {"ours": ours, "transformers": theirs}
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
                              "min_new_tokens=max_new_tokens)",
                          torch_threads=torch.get_num_threads(),
                          attn_implementation=ref.config._attn_implementation),
        greedy_tokens_agreeing_from_start=agree)
    r = result["decode_batch1"]
    r["speedup"] = r["transformers"]["decode_s_per_token"] / r["ours"]["decode_s_per_token"]
    print(f"decode batch 1: ours {r['ours']['decode_tokens_per_s']:.1f} tok/s, transformers "
          f"{r['transformers']['decode_tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x); greedy outputs agree "
          f"on the first {agree} of {n} tokens", flush=True)


# --- LSA against dense decode -----------------------------------------------------------------------------


def lsa_variants(names: list[str]) -> dict:
    all_ = {
        "lsa_xla": lambda: lj.Config.small(kernel_impl="xla"),
        "lsa_reference": lambda: lj.Config.small(kernel_impl="reference"),
        "lsa_xla_no_hi": lambda: lj.Config.small(kernel_impl="xla", hi_enabled=False),
        "dense": lambda: lj.Config.small(use_indexer=False, si_enabled=False, hi_enabled=False),
    }
    unknown = set(names) - set(all_)
    if unknown:
        raise ValueError(f"unknown LSA variants {sorted(unknown)}; choose from {', '.join(all_)}")
    return {n: all_[n] for n in names}


def prepare_decode_step(model, context: int, page_size: int, seed: int = 0):
    """(run one step, compile seconds): one paged_step (jit, batch 1, one new token at position context - 1)
    over a paged cache of `context` rows of random values."""
    from flax import nnx

    from longcat_jax.model.longcat import paged_step
    from longcat_jax.model.paged_cache import PagedCache, init_paged_cache

    cfg = model.cfg
    W = -(-context // page_size)
    k1, k2 = jax.random.split(jax.random.key(seed))
    abstract = jax.eval_shape(lambda: init_paged_cache(cfg, W, page_size))
    kv = jax.random.normal(k1, abstract.kv.shape, abstract.kv.dtype)
    index_k = None
    if abstract.index_k is not None:
        index_k = jax.random.normal(k2, abstract.index_k.shape, abstract.index_k.dtype)
    graphdef, params = nnx.split(model)

    def step(params, tokens, starts, new_lens, table, cache, history):
        return paged_step(nnx.merge(graphdef, params), tokens, starts, new_lens, table, cache, history)

    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, 1)), jnp.int32)
    starts, new_lens = jnp.asarray([context - 1], jnp.int32), jnp.asarray([1], jnp.int32)
    table = jnp.arange(W, dtype=jnp.int32)[None]
    H = (cfg.ngram_n or 1) - 1
    history = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, H)), jnp.int32) if H else None
    state = {"cache": PagedCache(kv=kv, index_k=index_k)}
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=5).lower(params, tokens, starts, new_lens, table, state["cache"],
                                                      history).compile()
    compile_s = time.perf_counter() - t

    def run():
        t = time.perf_counter()
        logits, state["cache"] = compiled(params, tokens, starts, new_lens, table, state["cache"], history)
        jax.block_until_ready((logits, state["cache"]))
        dt = time.perf_counter() - t
        if not bool(jnp.isfinite(logits).all()):
            raise FloatingPointError("non-finite logits")
        return dt

    return run, compile_s


def bench_lsa(args, result: dict, save) -> None:
    """Per context: every variant's step compiled, then the timed steps interleaved (A, B, C, A, B, C...),
    so load from other users of a shared machine hits all variants alike."""
    contexts = [int(x) for x in args.lsa_contexts.split(",")] if args.lsa_contexts else (
        [4096] if args.quick else [4096, 16384, 32768])
    if args.lsa_baseline_context and args.lsa_baseline_context not in contexts:
        contexts = [args.lsa_baseline_context, *contexts]
    out = dict(preset="small", contexts=contexts, page_size=args.page_size, steps=args.lsa_steps,
               warmup=args.lsa_warmup,
               what="the whole model's decode step (embedding with N-gram, 4 layers of MLA + MLPs + MoE, LM "
                    f"head), not attention alone; context {args.lsa_baseline_context} shows the part that "
                    "does not grow with the context",
               note="cache rows filled with random values: decode time does not depend on the contents, and "
                    "prefilling 32K tokens on this CPU would take far too long",
               variants={})
    result["lsa_decode"] = out
    models = {}
    for name, make in lsa_variants(args.lsa_variants.split(",")).items():
        cfg = make()
        t = time.perf_counter()
        models[name] = lj.build_model(cfg, seed=0)
        out["variants"][name] = dict(kernel_impl=cfg.kernel_impl, use_indexer=cfg.use_indexer,
                                     hi_enabled=cfg.hi_enabled, hi_min_len=cfg.hi_min_len,
                                     index_topk=cfg.index_topk if cfg.use_indexer else None,
                                     build_s=time.perf_counter() - t, rows=[])
    for ctx in contexts:
        runners = {}
        for name, model in models.items():
            try:
                runners[name] = prepare_decode_step(model, ctx, args.page_size)
            except Exception as e:  # out of memory at the longest contexts: report what fits
                error = f"{type(e).__name__}: {e}"[:400]
                out["variants"][name]["rows"].append(dict(context=ctx, error=error))
                print(f"lsa {name:14s} context {ctx:6d}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        times = {name: [] for name in runners}
        failed = {}
        for i in range(args.lsa_warmup + args.lsa_steps):
            for name, (run, _) in runners.items():
                if name in failed:
                    continue
                try:
                    dt = run()
                except Exception as e:
                    failed[name] = f"{type(e).__name__}: {e}"[:400]
                    continue
                if i >= args.lsa_warmup:
                    times[name].append(dt)
        for name, (_, compile_s) in runners.items():
            if name in failed:
                row = dict(context=ctx, error=failed[name])
                msg = row["error"][:200]
            else:
                row = dict(context=ctx, median_s=statistics.median(times[name]), times_s=times[name],
                           compile_s=compile_s, cache_pages=-(-ctx // args.page_size),
                           page_size=args.page_size)
                msg = f"{row['median_s'] * 1e3:8.2f} ms/token (compile {compile_s:.1f} s)"
            out["variants"][name]["rows"].append(row)
            print(f"lsa {name:14s} context {ctx:6d}: {msg}", flush=True)
        del runners
        save()
    dense = {r["context"]: r.get("median_s") for r in out["variants"].get("dense", {}).get("rows", [])}
    for name, v in out["variants"].items():
        if name == "dense":
            continue
        for r in v["rows"]:
            if r.get("median_s") and dense.get(r["context"]):
                r["speedup_vs_dense"] = dense[r["context"]] / r["median_s"]


# --- Summary ----------------------------------------------------------------------------------------------


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize(result: dict) -> dict:
    s, targets = {}, {}
    srv = result.get("serving", {})
    if all("levels" in srv.get(n, {}) for n in ("ours", "transformers")):
        by = {name: {r["concurrency"]: r for r in srv[name]["levels"]} for name in ("ours", "transformers")}
        for c in srv["levels"]:
            o, t = by["ours"].get(c), by["transformers"].get(c)
            if o and t:
                s[f"throughput_ratio_at_{c}"] = ratio(o["output_tokens_per_s"], t["output_tokens_per_s"])
                s[f"ttft_median_ratio_at_{c}"] = ratio(o["ttft_median_s"], t["ttft_median_s"])
                s[f"tpot_median_ratio_at_{c}"] = ratio(o["tpot_median_s"], t["tpot_median_s"])
        for c in (8, 32):
            if f"throughput_ratio_at_{c}" in s:
                targets[f">= 3x transformers serve throughput at {c} streams, lower median TTFT"] = bool(
                    s[f"throughput_ratio_at_{c}"] >= 3 and (s[f"ttft_median_ratio_at_{c}"] or 9) < 1)
    if "decode_batch1" in result:
        s["decode_batch1_speedup"] = result["decode_batch1"]["speedup"]
        targets[">= 3x transformers generate at batch-1 decode"] = bool(s["decode_batch1_speedup"] >= 3)
    lsa = result.get("lsa_decode", {}).get("variants", {})
    main = lsa.get("lsa_xla")
    if main:
        rows = {r["context"]: r for r in main["rows"] if "median_s" in r}
        if 32768 in rows and rows[32768].get("speedup_vs_dense"):
            s["lsa_speedup_at_32k"] = rows[32768]["speedup_vs_dense"]
            targets["LSA decode >= 2x dense at 32K"] = bool(s["lsa_speedup_at_32k"] >= 2)
        if 4096 in rows and 32768 in rows:
            s["lsa_growth_4k_to_32k"] = rows[32768]["median_s"] / rows[4096]["median_s"]
            targets["LSA time per token nearly flat 4K->32K (<= 1.5x)"] = bool(
                s["lsa_growth_4k_to_32k"] <= 1.5)
        d = {r["context"]: r for r in lsa.get("dense", {}).get("rows", []) if "median_s" in r}
        if 4096 in d and 32768 in d:
            s["dense_growth_4k_to_32k"] = d[32768]["median_s"] / d[4096]["median_s"]
    s["targets"] = targets
    return s


def print_summary(result: dict) -> None:
    s = result["summary"]
    srv = result.get("serving", {})
    if srv:
        print("\n=== Serving (streaming chat completions, greedy, "
              f"{srv.get('max_tokens')} output tokens; folder: {result['folder']['params'] / 1e6:.1f}M "
              "params) ===")
    names = [n for n in ("ours", "transformers") if "levels" in srv.get(n, {})]
    for n in ("ours", "transformers"):
        if "error" in srv.get(n, {}):
            print(f"  {n}: FAILED: {srv[n]['error'].strip().splitlines()[-1]}")
    if names:
        print(f"{'streams':>7} {'server':>13} {'tok/s':>9} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} "
              f"{'TPOT p99':>9} {'tok/req':>9} {'errors':>6}")
        for c in srv["levels"]:
            for n in names:
                r = next((x for x in srv[n]["levels"] if x["concurrency"] == c), None)
                if r is None:
                    continue
                tpr = r["output_tokens_per_request"]
                print(f"{c:7d} {n:>13} {r['output_tokens_per_s']:9.1f} {fmt_ms(r['ttft_median_s']):>9} "
                      f"{fmt_ms(r['ttft_p99_s']):>9} {fmt_ms(r['tpot_median_s']):>9} "
                      f"{fmt_ms(r['tpot_p99_s']):>9} "
                      f"{tpr['min']:>4}-{tpr['max']:<4} {len(r['errors']):6d}")
            if f"throughput_ratio_at_{c}" in s:
                print(f"{c:7d} {'ours/theirs':>13} {s[f'throughput_ratio_at_{c}']:8.2f}x "
                      f"{s[f'ttft_median_ratio_at_{c}']:8.2f}x {'':9} {s[f'tpot_median_ratio_at_{c}']:8.2f}x")
        for n in names:
            print(f"  {n} startup (load + compile/warm-up until /health): {srv[n]['startup_s']:.1f} s")
        if "ours" in names:
            per = {r["concurrency"]: r.get("programs_compiled_during_timed_requests")
                   for r in srv["ours"]["levels"]}
            print(f"  ours: engine programs compiled while timed requests ran, by streams: {per} "
                  f"(of {srv['ours'].get('programs_compiled_total')} in all)")
    if "decode_batch1" in result:
        d = result["decode_batch1"]
        print(f"\n=== Decode, batch 1, {d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens ===")
        for n in ("ours", "transformers"):
            print(f"{n:>13}: {d[n]['decode_s_per_token'] * 1e3:7.2f} ms/token = "
                  f"{d[n]['decode_tokens_per_s']:7.1f} tok/s  (64 tokens in {d[n]['median_full_s']:.2f} s)")
        print(f"{'ours/theirs':>13}: {d['speedup']:.2f}x faster; greedy outputs agree on the first "
              f"{d['greedy_tokens_agreeing_from_start']} tokens")
    lsa = result.get("lsa_decode")
    if lsa:
        print("\n=== Decode step, small preset, batch 1, paged cache of random rows (ms/token) ===")
        print(f"{'context':>8} " + " ".join(f"{n:>14}" for n in lsa["variants"])
              + "   LSA(xla)/dense speedup")
        for ctx in lsa["contexts"]:
            cells, sp = [], ""
            for n, v in lsa["variants"].items():
                r = next((x for x in v["rows"] if x["context"] == ctx), {})
                cells.append(f"{r['median_s'] * 1e3:14.2f}" if "median_s" in r else f"{'-':>14}")
                if n == "lsa_xla" and r.get("speedup_vs_dense"):
                    sp = f"{r['speedup_vs_dense']:.2f}x"
            print(f"{ctx:8d} " + " ".join(cells) + f"   {sp}")
    print("\n=== Targets ===")
    for k, v in s["targets"].items():
        print(f"  {'met    ' if v else 'NOT met'}  {k}")
    if not s["targets"]:
        print("  (none measurable in this run)")


def save_png(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    srv = result.get("serving", {})
    labels = {"ours": "longcat-jax serve.py", "transformers": "transformers serve --continuous-batching"}
    for name, color in (("ours", "C0"), ("transformers", "C1")):
        if "levels" in srv.get(name, {}):
            rows = srv[name]["levels"]
            xs = [r["concurrency"] for r in rows]
            a.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", color=color, label=labels[name])
            b.plot(xs, [r["ttft_median_s"] * 1e3 for r in rows], marker="o", color=color,
                   label=labels[name] + " (median)")
            b.plot(xs, [r["ttft_p99_s"] * 1e3 for r in rows], marker="x", ls="--", color=color,
                   label=labels[name] + " (p99)")
    for ax, title, unit in ((a, "output throughput", "tokens/s"), (b, "time to first token", "ms")):
        ax.set_xscale("log", base=2)
        if srv.get("levels"):
            ax.set_xticks(srv["levels"], [str(x) for x in srv["levels"]])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
    b.set_yscale("log")
    lsa = result.get("lsa_decode", {}).get("variants", {})
    for name, v in lsa.items():
        pts = [(r["context"], r["median_s"] * 1e3) for r in v["rows"] if "median_s" in r]
        if pts:
            c.plot(*zip(*pts), marker="o", label=name)
    c.set_xscale("log", base=2)
    if result.get("lsa_decode"):
        c.set_xticks(result["lsa_decode"]["contexts"],
                     [f"{x // 1024}K" if x >= 1024 else str(x) for x in result["lsa_decode"]["contexts"]])
    c.set_xlabel("context (tokens)")
    c.set_ylabel("ms per token")
    c.set_title("decode step, small preset: LSA vs dense")
    if c.lines:
        c.legend(fontsize=7)
    fig.suptitle(f"CPU ({result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores), float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
