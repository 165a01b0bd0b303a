"""The CPU serving step's kernels (`pallas_kernels.cpu_serving`) against XLA's paths: the few-row matmul
alone, and whole serving steps with every kernel on or off.

    python bench/cpu_serving.py [--reps N] [--out PATH.json]

  matmuls   x [M, K] @ w [K, N] in float32 for the serving benchmark model's weight shapes, M = 1..32 rows:
            XLA's, the kernel's, and the kernel's over the same weights in bfloat16; 32 different weights per
            call, so that they stream from memory as a decode step's do. Median microseconds per matmul and
            the weight bytes read per second.
  steps     `paged_step` programs of a random model with the serving benchmark's dimensions (the `small`
            preset in the Flash layout, vocabulary 8192): decode steps of 1-32 rows (positions 100 of 256,
            or of 512 for 32 rows) and prefill chunks, compiled twice in one process (kernels off: the
            build reported unavailable while tracing; on: as served), plus the kernels' program over the
            same model with its weights in bfloat16 (float32 compute: serve.py's default for a bfloat16
            checkpoint on CPU), all run alternately with random tokens after warm-up. The float32 sides'
            logits are compared as a check.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import longcat_jax as lj  # noqa: E402
from longcat_jax.model.paged_cache import init_paged_cache  # noqa: E402
from longcat_jax.serving.settings import EngineSettings  # noqa: E402
from longcat_jax.serving.step_programs import StepPrograms  # noqa: E402
from pallas_kernels import cpu_serving  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "cpu_serving.json")


def timed(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_matmuls(cfg, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    D = cfg.hidden_size
    shapes = [(D, cfg.ffn_hidden_size), (cfg.ffn_hidden_size, D), (D, cfg.expert_ffn_hidden_size),
              (D, cfg.vocab_size)]
    rows = []
    for K, N in shapes:
        weights = [jnp.asarray(rng.standard_normal((K, N), np.float32)) for _ in range(32)]
        halves = [w.astype(jnp.bfloat16) for w in weights]
        for M in (1, 2, 4, 8, 16, 32):
            x = jnp.asarray(rng.standard_normal((M, K), np.float32))
            xla = jax.jit(lambda x, ws: [x @ w for w in ws])
            ours = jax.jit(lambda x, ws: [cpu_serving.small_rows_matmul(x, w) for w in ws])
            np.testing.assert_allclose(np.asarray(ours(x, weights[:1])[0]), np.asarray(x @ weights[0]),
                                       rtol=1e-4, atol=1e-3)
            t_xla, t_ours, t_bf16 = (timed(f, (x, ws), reps) / len(ws)
                                     for f, ws in ((xla, weights), (ours, weights), (ours, halves)))
            mb = K * N * 4 / 1e6
            rows.append(dict(M=M, K=K, N=N, xla_us=t_xla * 1e6, kernel_us=t_ours * 1e6,
                             xla_gb_s=mb / t_xla / 1e3, kernel_gb_s=mb / t_ours / 1e3,
                             speedup=t_xla / t_ours, kernel_bf16_us=t_bf16 * 1e6,
                             bf16_speedup_vs_kernel=t_ours / t_bf16))
            print(f"[{M:2d},{K}] x [{K},{N}]: XLA {t_xla * 1e6:7.1f} us ({mb / t_xla / 1e3:4.1f} GB/s)  "
                  f"kernel {t_ours * 1e6:7.1f} us ({mb / t_ours / 1e3:4.1f} GB/s)  {t_xla / t_ours:.2f}x  "
                  f"bf16 weights {t_bf16 * 1e6:7.1f} us ({t_ours / t_bf16:.2f}x)", flush=True)
    return rows


def bench_steps(cfg, reps: int) -> list[dict]:
    model = lj.build_model(cfg, seed=0)
    settings = EngineSettings(max_num_seqs=32, max_model_len=512).checked()
    cache = init_paged_cache(cfg, settings.pool_pages, settings.page_size)
    halves = lj.build_model(dataclasses.replace(cfg, param_dtype="bfloat16"), seed=0)  # the same, rounded
    sides, available = {}, cpu_serving.available
    for name, built, m in (("xla", lambda: False, model), ("kernel", available, model),
                           ("kernel_bf16", available, halves)):
        cpu_serving.available = built  # asked while a program is traced, i.e. in `_compile` below
        programs = StepPrograms(m, settings, cache)
        sides[name] = (programs, {shape: programs._compile(shape) for shape in STEP_SHAPES})
    cpu_serving.available = available
    rng = np.random.default_rng(0)
    rows = []
    for shape in STEP_SHAPES:
        B, T, W = shape
        args = step_inputs(rng, shape, cfg.vocab_size, settings.pool_pages)
        logits = {}
        for name, (programs, compiled) in sides.items():
            logits[name], cache = compiled[shape](programs._params, *args, cache, None)
        diff = float(np.abs(np.asarray(logits["xla"]) - np.asarray(logits["kernel"])).max())
        times = {name: [] for name in sides}
        for i in range(40 + reps):  # the first 40: every expert's branch runs in every program
            args = step_inputs(rng, shape, cfg.vocab_size, settings.pool_pages)
            for name, (programs, compiled) in sides.items():
                t = time.perf_counter()
                out, cache = compiled[shape](programs._params, *args, cache, None)
                out.block_until_ready()
                if i >= 40:
                    times[name].append(time.perf_counter() - t)
        t_xla, t_ours, t_bf16 = (statistics.median(times[k]) for k in ("xla", "kernel", "kernel_bf16"))
        rows.append(dict(rows=B, tokens=T, pages=W, xla_ms=t_xla * 1e3, kernel_ms=t_ours * 1e3,
                         speedup=t_xla / t_ours, max_abs_logit_diff=diff, kernel_bf16_ms=t_bf16 * 1e3,
                         bf16_speedup_vs_kernel=t_ours / t_bf16))
        print(f"step {B:2d} rows x {T:3d} tokens, {W} pages: XLA {t_xla * 1e3:6.2f} ms  kernel "
              f"{t_ours * 1e3:6.2f} ms  {t_xla / t_ours:.3f}x  (max |logit diff| {diff:.1e})  bf16 weights "
              f"{t_bf16 * 1e3:6.2f} ms ({t_ours / t_bf16:.2f}x)", flush=True)
    return rows


def step_inputs(rng, shape, vocab: int, pool_pages: int):
    """Random tokens for every row, each row on its own random pages."""
    B, T, W = shape
    tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
    starts = np.full(B, 100 if T == 1 else 0, np.int32)
    table = rng.permutation(pool_pages)[: B * W].reshape(B, W).astype(np.int32)
    return tokens, starts, np.full(B, T, np.int32), table


STEP_SHAPES = [(1, 1, 16), (8, 1, 16), (16, 1, 16), (32, 1, 32), (1, 64, 16), (1, 128, 16), (1, 256, 16)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if not cpu_serving.available():
        raise SystemExit("the kernel could not be built on this machine (see the warning above)")
    cfg = lj.Config.small(vocab_size=8192, ngram_n=0, use_indexer=False, si_enabled=False, hi_enabled=False,
                          mtp_num_steps=0)
    result = dict(command="python bench/cpu_serving.py " + " ".join(argv or sys.argv[1:]),
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                  machine=dict(processor=platform.processor(), cpus=os.cpu_count(), jax=jax.__version__,
                               cpu_model=next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                               if line.startswith("model name")), "")),
                  matmuls=bench_matmuls(cfg, a.reps), steps=bench_steps(cfg, a.reps))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
