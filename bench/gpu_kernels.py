"""The Pallas kernels compiled on a GPU: parity with the XLA path, time, achieved TFLOP/s and GB/s.

    python bench/gpu_kernels.py --json bench/results/gpu_kernels.json          # on the GPU machine
    python bench/gpu_kernels.py --allow-cpu --seq-len 64                       # checks this script on CPU

One run, every case of `bench/gpu_cases.py` at the `small` preset's tiles: the compiled kernels
(impl="pallas") against the XLA path (impl="xla") on the same inputs, then both timed (median of --reps
runs after a warm-up). FLOPs are the kernel's useful work counted from the shapes (`FLOPS` below), bytes the
least HBM traffic it needs (its inputs and outputs, gathered rows counted per read); the ratios are against
an H200's peaks (989 TFLOP/s bf16 dense, 4.8 TB/s). On CPU the kernels run in interpret mode: the numbers
mean nothing there, the flag only exercises the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from gpu_cases import CASES, kernel_cases

from longcat_jax.config import Config

H200_FLOPS, H200_BYTES = 989e12, 4.8e12


def work(name: str, cfg: Config, B: int, T: int) -> tuple[float, float] | None:
    """(FLOPs, least HBM bytes) of one call of case `name`; None where no simple count applies."""
    I, J, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    N, R, Hr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    pairs = B * T * (T + 1) / 2  # causal (query, key) pairs the dense indexer scores
    index_io = B * T * (I * J * 2 + J * 2 + I * 4 + K * 4)
    rows = B * T * K * (R + Hr) * 2  # one read of every selected latent row, bf16
    if name in ("indexer_topk", "indexer_topk_window_apart", "indexer_blocks"):
        return 2 * pairs * I * J, index_io
    if name == "indexer_kl_fwd_bwd":  # forward, dq/dw (recomputes), dk (recomputes): 5 passes of q.k and back
        return 5 * 2 * B * T * K * I * J, 3 * B * T * K * J * 2 + index_io
    if name == "sparse_mla_fwd_bwd":
        # forward 2NK(2R+Hr) + probs pass 2NK(R+Hr); backward delta pass 2NK(R+Hr) + 2NK(5R+3Hr).
        per_query = 2 * N * K * ((2 * R + Hr) + 2 * (R + Hr) + (5 * R + 3 * Hr))
        return B * T * per_query, 4 * rows + B * T * K * (R + Hr) * 4
    if name == "sparse_mla_decode_paged":
        return 2 * B * N * K * (2 * R + Hr), B * K * (R + Hr) * 2
    return None


def timed(fn, args, reps: int) -> float:
    """Median seconds of jit(fn)(*args) after one warm-up (compile) call."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity(got, want) -> float:
    """Largest error relative to the reference's largest magnitude; for int (index) outputs the share of
    entries that differ (near-equal scores may swap two keys: see indexer_topk's docstring)."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if np.issubdtype(w.dtype, np.integer):
            worst = max(worst, float(np.mean(g != w)))
        else:
            g, w = g.astype(np.float64), w.astype(np.float64)
            worst = max(worst, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=Config.PRESETS)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--allow-cpu", action="store_true", help="run in interpret mode to check the script")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        parser.error(f"no GPU (default backend {backend!r}); --allow-cpu runs the script in interpret mode")
    cfg = Config.preset(args.preset)
    kernels = kernel_cases(cfg, T=args.seq_len, batch=args.batch, impl="pallas")
    references = kernel_cases(cfg, T=args.seq_len, batch=args.batch, impl="xla")
    rows = []
    for name in args.cases.split(","):
        (fn, fn_args, _), (ref_fn, _, _) = kernels[name], references[name]
        row = {"case": name, "parity": parity(jax.jit(fn)(*fn_args), jax.jit(ref_fn)(*fn_args))}
        row["pallas_ms"] = 1e3 * timed(fn, fn_args, args.reps)
        row["xla_ms"] = 1e3 * timed(ref_fn, fn_args, args.reps)
        row["speedup_vs_xla"] = row["xla_ms"] / row["pallas_ms"]
        counted = work(name, cfg, args.batch, args.seq_len)
        if counted:
            seconds = row["pallas_ms"] / 1e3
            row["tflops"], row["gbps"] = counted[0] / seconds / 1e12, counted[1] / seconds / 1e9
            row["flops_share_of_peak"] = counted[0] / seconds / H200_FLOPS
            row["bytes_share_of_peak"] = counted[1] / seconds / H200_BYTES
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json:
        meta = {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "backend": backend,
                "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "command": "python bench/gpu_kernels.py " + " ".join(argv or sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "cases": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
