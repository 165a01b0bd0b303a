"""Training throughput: longcat-jax's `small` preset against transformers' LongcatFlashForCausalLM (PyTorch).

One process, one CPU, the same dimensions, batch, sequence length, loss and optimizer on both sides:

  ours       Config.small() with the N-gram embedding, indexer (LSA) and MTP switched off (the reference
             has none of them); `forward` + next-token CE through the fused LM head (`lm_loss.lm_head_stats`,
             as train.py computes it) + `jax.value_and_grad` + optax AdamW
             (`make_optimizer(use_muon=False)`: global-norm clip 1.0, AdamW b=(0.9, 0.95), wd 0.1), one
             `jax.jit`.
  reference  LongcatFlashForCausalLM from the same dimensions (`hf.config.config_to_hf`), logits + CE +
             backward + clip_grad_norm_(1.0) + torch.optim.AdamW, torch.set_num_threads(cpu count).

`--capacity-factor CF` adds a third side: ours with the capacity-factor MoE dispatch (per-expert SwiGLU over
[E, C, D] buffers, overflow dropped) instead of the dropless one (sort by expert, then `lax.ragged_dot` on
GPU/TPU and a loop over per-expert row tiles on CPU, `expert_tiles.tiled_expert_ffn`).

Every side runs in float32 on the same fixed random batch. After warm-up (JAX compile, first torch steps)
the timed steps are interleaved A, B, A, B... so load from other users of a shared machine hits all sides
alike; the table reports the median step time as tokens/s, and per side the median minor page faults and
system CPU seconds of a step (getrusage around it). Peak RSS is the whole process's, all sides together.
The process keeps freed host memory as train.py does (`longcat_jax.training.host_allocator`) unless
--default-malloc.

Achieved FLOP/s uses *model* FLOPs (analytic, what an MFU figure counts): 6 x active matmul parameters x
tokens (MLA projections, dense MLPs, router, the expected real experts per token K*E/(E+Z), LM head) plus
the attention score and value matmuls over the full T x T square (no causal saving, as the code computes
it) x 3 for forward + backward. It is divided by the rate of a large f32 jnp matmul (`--matmul-size`^3,
best of 3) timed in this process in every round, right after the steps; the fraction is the median over
rounds. XLA's own `cost_analysis()` flops of the compiled step are also recorded, but they are not
comparable: XLA counts a loop body once: the layer scan's (not per layer) and the expert-tile loop's
(not per tile).

`--bf16` adds bf16 compute on both sides (ours: `Config.dtype="bfloat16"`, float32 parameters and optimizer
state; the reference: its forward and loss under `torch.autocast("cpu", torch.bfloat16)`); each bf16 side is
compared with the other's bf16 side, and its share of the matmul rate with a bf16 jnp matmul.

Usage:
  python bench/train.py [--steps N] [--batch-size B] [--seq-len T] [--json PATH] [--png PATH]
                        [--capacity-factor CF] [--bf16] [--pause S] [--default-malloc]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longcat_jax import Config, abstract_model, build_model, forward
from longcat_jax.hf.config import FLASH, config_to_hf
from longcat_jax.training.host_allocator import keep_freed_host_memory
from longcat_jax.training.lm_loss import lm_head_stats
from longcat_jax.training.matmul_rate import matmul_rates
from longcat_jax.training.model_flops import active_matmul_params, step_flops
from longcat_jax.training.optim import OptimizerSettings, make_optimizer

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_cpu.json")
LR, BETAS, EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def bench_config(**changes) -> Config:
    """The `small` preset with every feature the reference lacks switched off."""
    return Config.small(ngram_n=0, use_indexer=False, si_enabled=False, hi_enabled=False, mtp_num_steps=0,
                        **changes)


def analytic_flops(cfg: Config, batch: int, seq: int) -> dict:
    """Model FLOPs of one training step (forward + backward), analytic: train.py's MFU count
    (`training.model_flops`), here with every key scored (no indexer in the bench config).

    Returns a dict: active_params (matmul weights one token touches), real_experts_per_token, flops_params
    (6 x active x tokens), flops_attention (3 x forward score + value matmuls over the full T x T square),
    flops (their sum).
    """
    _, params = nnx.split(abstract_model(cfg))
    active = active_matmul_params(cfg, params)
    flops = step_flops(cfg, params, batch, seq, sparse=False)
    real_experts = cfg.expected_real_experts or cfg.moe_topk * cfg.n_routed_experts / cfg.num_slots
    return dict(active_params=active, real_experts_per_token=real_experts,
                flops_params=6 * active * batch * seq, flops_attention=flops - 6 * active * batch * seq,
                flops=flops)


def random_batch(cfg: Config, batch: int, seq: int, seed: int = 0):
    """inputs, targets: int32 numpy [B, T] (targets are inputs shifted by one)."""
    toks = np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    return toks[:, :-1], toks[:, 1:]


# --- Matmul peak ------------------------------------------------------------------------------------------


def torch_matmul_rates(n: int, reps: int) -> list[float]:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return rates


# --- The two training steps -------------------------------------------------------------------------------


def bench_optimizer(params):
    """Our side's optimizer: AdamW with the reference's settings (constant rate, global-norm clip)."""
    return make_optimizer(OptimizerSettings(lr=LR, warmup_steps=0, total_steps=10**6, schedule="wsd",
                                            wsd_decay_fraction=1e-6, weight_decay=WD, clip_norm=CLIP,
                                            use_muon=False, adam_b1=BETAS[0], adam_b2=BETAS[1], adam_eps=EPS),
                          params)


def make_jax_step(cfg: Config, inputs, targets):
    """Build, compile and return (run_one_step, compile_seconds, xla_cost_flops)."""
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tx = bench_optimizer(params)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):  # next-token CE through the fused LM head, as train.py computes it
        model = nnx.merge(graphdef, params)
        h = model.final_norm(forward(model, x, with_mtp=False).hidden)
        lse, target_logit = lm_head_stats(h, model.lm_head[...], y)
        return (lse - target_logit).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x, y = jnp.asarray(inputs), jnp.asarray(targets)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = {"params": params, "opt": opt_state, "loss": [], "hlo": compiled.as_text()}

    def run():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], x, y)
        jax.block_until_ready((state["params"], state["opt"], loss))
        state["loss"].append(float(loss))

    return run, compile_s, float(cost.get("flops", float("nan"))), state


def make_torch_step(cfg: Config, inputs, targets, threads: int, autocast: bool = False):
    """Build the reference model and return (run_one_step, info dict). autocast: the forward and loss under
    torch.autocast(bfloat16), PyTorch's mixed precision (parameters and optimizer stay float32)."""
    import torch
    import torch.nn.functional as F
    import torch.profiler
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = config_to_hf(cfg, FLASH)
    hf.pop("longcat_jax"), hf.pop("architectures"), hf.pop("model_type")
    hf_cfg = LongcatFlashConfig(**hf)
    model = LongcatFlashForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    x, y = torch.from_numpy(np.asarray(inputs)).long(), torch.from_numpy(np.asarray(targets)).long()
    losses = []

    def run():  # the record_function labels let bench/train_profile.py split the step's time
        opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("forward + loss"), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer update"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        losses.append(float(loss.detach()))

    info = dict(params=sum(p.numel() for p in model.parameters()),
                attn_implementation=hf_cfg._attn_implementation, threads=torch.get_num_threads(),
                losses=losses)
    return run, info


# --- Run ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compile")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds of idle before every timed step and matmul measurement")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="also time ours with capacity-factor MoE dispatch (drops overflow) as a third side")
    p.add_argument("--bf16", action="store_true",
                   help="also time both sides with bf16 compute: ours with Config.dtype=bfloat16, the "
                        "reference under torch.autocast(bfloat16); parameters and optimizer float32 on both")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is (no keep_freed_host_memory)")
    p.add_argument("--json", default=DEFAULT_JSON, help="result file ('' to skip)")
    p.add_argument("--png", default="", help="optional bar chart of tokens/s")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "matmul_size", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    return a


def machine_info() -> dict:
    import torch
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
                jax_backend=jax.default_backend(), torch=torch.__version__,
                transformers=transformers.__version__,
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), loadavg_start=load)


def run(args) -> dict:
    cfg = bench_config()
    B, T = args.batch_size, args.seq_len
    tokens = B * T
    inputs, targets = random_batch(cfg, B, T)
    info = machine_info()

    # Timed sides, run in this order every round: ours, [ours with capacity dispatch], [ours in bf16],
    # reference, [reference in bf16].
    sides = {}
    run_fn, compile_s, xla_flops, state = make_jax_step(cfg, inputs, targets)
    sides["ours"] = dict(run=run_fn, compile_s=compile_s, xla_flops=xla_flops, state=state)
    if args.capacity_factor is not None:
        run_fn, compile_s, xla_flops, state = make_jax_step(cfg.replace(capacity_factor=args.capacity_factor),
                                                            inputs, targets)
        sides["ours_capacity"] = dict(run=run_fn, compile_s=compile_s, xla_flops=xla_flops, state=state)
    if args.bf16:
        run_fn, compile_s, xla_flops, state = make_jax_step(cfg.replace(dtype="bfloat16"), inputs, targets)
        sides["ours_bf16"] = dict(run=run_fn, compile_s=compile_s, xla_flops=xla_flops, state=state)
    torch_run, torch_info = make_torch_step(cfg, inputs, targets, args.threads)
    sides["reference"] = dict(run=torch_run, info=torch_info)
    if args.bf16:
        torch_run, bf16_info = make_torch_step(cfg, inputs, targets, args.threads, autocast=True)
        sides["reference_bf16"] = dict(run=torch_run, info=bf16_info)
    for _ in range(args.warmup):
        for side in sides.values():
            side["run"]()
    # Interleaved A, B, A, B..., and the matmul rate inside every round, so a step and the rate it is compared
    # with see the same load from other users of the machine.
    times, mm = {name: [] for name in sides}, []
    faults, system_s = {name: [] for name in sides}, {name: [] for name in sides}  # process-wide, per step
    matmul_rates(args.matmul_size, 1)  # compile outside the timed rounds
    mm_bf16 = []  # the bf16 sides' yardstick (--bf16)
    if args.bf16:
        matmul_rates(args.matmul_size, 1, jnp.bfloat16)
    # The pause lets the previous side's worker threads stop spinning (OpenMP and MKL spin-wait after each
    # parallel region) before the next side is timed, so no side pays for another's idle threads.
    for _ in range(args.steps):
        for name, side in sides.items():
            time.sleep(args.pause)
            before = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            side["run"]()
            times[name].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(after.ru_minflt - before.ru_minflt)
            system_s[name].append(after.ru_stime - before.ru_stime)
        time.sleep(args.pause)
        mm.append(max(matmul_rates(args.matmul_size, 3)))
        if args.bf16:
            mm_bf16.append(max(matmul_rates(args.matmul_size, 3, jnp.bfloat16)))
    torch_mm = torch_matmul_rates(args.matmul_size, 5)
    fl = analytic_flops(cfg, B, T)
    mm_rate = statistics.median(mm)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # all sides together
    result = dict(
        machine=info,
        settings=dict(batch_size=B, seq_len=T, tokens_per_step=tokens, steps=args.steps, warmup=args.warmup,
                      dtype="float32", torch_threads=torch_info["threads"], matmul_size=args.matmul_size,
                      lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, clip_norm=CLIP,
                      config={k: getattr(cfg, k) for k in (
                          "vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank",
                          "kv_lora_rank",
                          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
                          "expert_ffn_hidden_size", "n_routed_experts", "zero_expert_num", "moe_topk",
                          "routed_scaling_factor")}),
        flops=dict(fl, method="analytic model FLOPs (6 x active params x tokens + 3 x full-square attention)",
                   xla_note="xla_cost_analysis_flops counts the layer scan body and the expert-tile "
                            "loop body once each"),
        matmul=dict(jax_flops_per_s_per_round=mm, jax_median=mm_rate, torch_flops_per_s=torch_mm,
                    torch_median=statistics.median(torch_mm), jax_bf16_flops_per_s_per_round=mm_bf16),
    )
    for name, side in sides.items():
        med = statistics.median(times[name])
        # The fraction is the median over rounds of (step FLOP/s / that round's matmul rate in its dtype).
        rates = mm_bf16 if name.endswith("_bf16") else mm
        frac = statistics.median(fl["flops"] / t / m for t, m in zip(times[name], rates))
        row = dict(step_s=times[name], median_step_s=med, tokens_per_s=tokens / med,
                   flops_per_s=fl["flops"] / med, fraction_of_matmul=frac,
                   minor_page_faults_per_step=statistics.median(faults[name]),
                   system_cpu_s_per_step=statistics.median(system_s[name]))
        if name.startswith("reference"):
            info_ = side["info"]
            row.update(params=info_["params"], attn_implementation=info_["attn_implementation"],
                       losses=info_["losses"],
                       dtype="bfloat16 autocast" if name.endswith("_bf16") else "float32")
        else:
            row.update(compile_s=side["compile_s"], xla_cost_analysis_flops=side["xla_flops"],
                       params=int(sum(x.size for x in jax.tree.leaves(side["state"]["params"]))),
                       losses=side["state"]["loss"],
                       dtype="bfloat16 compute" if name.endswith("_bf16") else "float32",
                       moe_dispatch=f"capacity_factor={args.capacity_factor} (drops overflow)"
                       if name == "ours_capacity" else "dropless (per-expert tiles on CPU)")
        result[name] = row
    for name in sides:  # each of ours against the reference in the same dtype
        if not name.startswith("reference"):
            ref = "reference_bf16" if name.endswith("_bf16") else "reference"
            speedup = result[ref]["median_step_s"] / result[name]["median_step_s"]
            result[name]["speedup_vs_reference"] = speedup
    result["targets"] = dict(faster_than_reference=result["ours"]["speedup_vs_reference"] > 1,
                             at_least_half_matmul_rate=result["ours"]["fraction_of_matmul"] >= 0.5)
    return result


def print_table(r: dict):
    s, g = r["settings"], 1e9
    print(f"\nLongCat small (no N-gram / indexer / MTP), B={s['batch_size']} T={s['seq_len']} f32, "
          f"{r['machine']['cpu_count']} CPUs, {s['steps']} interleaved steps (median), "
          f"{r['flops']['flops'] / g:.1f} model GFLOP per step")
    print(f"{'':40}{'tokens/s':>10}{'step s':>9}{'GFLOP/s':>9}{'of matmul':>11}{'vs ref':>8}{'params':>13}"
          f"{'faults':>10}{'sys s':>7}")
    names = {"ours": "ours (JAX, MoE dropless)", "reference": None, "reference_bf16": None,
             "ours_capacity": "ours (JAX, MoE capacity_factor)", "ours_bf16": "ours (JAX, dropless, bf16)"}
    for key in ("ours", "ours_capacity", "ours_bf16", "reference", "reference_bf16"):
        if key not in r:
            continue
        row = r[key]
        name = names[key] or (f"transformers ({row['attn_implementation']}, eager MoE"
                              + (", bf16)" if key.endswith("_bf16") else ")"))
        vs = f"{row['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in row else "1.00x"
        print(f"{name:40}{row['tokens_per_s']:10.1f}{row['median_step_s']:9.3f}{row['flops_per_s'] / g:9.2f}"
              f"{row['fraction_of_matmul']:11.1%}{vs:>8}{row['params']:13,}"
              f"{row['minor_page_faults_per_step']:10,.0f}{row['system_cpu_s_per_step']:7.2f}")
    t, o = r["targets"], r["ours"]
    print(f"matmul {s['matmul_size']}^3 f32: jax {r['matmul']['jax_median'] / g:.1f} GFLOP/s, "
          f"torch {r['matmul']['torch_median'] / g:.1f} GFLOP/s; XLA cost_analysis of our step "
          f"{o['xla_cost_analysis_flops'] / g:.1f} G (not comparable, see JSON); "
          f"compile {o['compile_s']:.1f} s; peak RSS {r['machine']['peak_rss_gb']:.2f} GB (whole process)")
    print(f"targets: faster than reference {t['faster_than_reference']}, >= 50% of matmul rate "
          f"{t['at_least_half_matmul_rate']};  load avg {r['machine']['loadavg_start']} -> "
          f"{r['machine']['loadavg_end']}")


def save_png(r: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    keys = [k for k in ("ours", "ours_capacity", "ours_bf16", "reference", "reference_bf16") if k in r]
    labels = {"ours": "longcat-jax", "ours_capacity": "longcat-jax\n(capacity)", "reference": "transformers",
              "ours_bf16": "longcat-jax\nbf16", "reference_bf16": "transformers\nbf16"}
    ax.bar([labels[k] for k in keys], [r[k]["tokens_per_s"] for k in keys])
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"small preset, B={r['settings']['batch_size']} T={r['settings']['seq_len']}, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    # As train.py does, for the whole process: the reference side gets it too.
    kept = False if args.default_malloc else keep_freed_host_memory()
    r = run(args)
    r["settings"]["keep_freed_host_memory"] = kept
    print_table(r)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1, default=float)
        print(f"wrote {args.json}")
    if args.png:
        save_png(r, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
