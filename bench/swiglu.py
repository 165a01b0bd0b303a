"""The SwiGLU MLP's forward + backward: `layers.swiglu` (hand-written backward) against JAX's derivative of
the same forward, at the `small` preset's dense MLP size, in one process.

    python bench/swiglu.py [--json PATH]

Both sides run the same jitted vjp (forward, then the cotangent of a fixed random output gradient) in float32;
the table reports the median of `--reps` runs each, interleaved, and the time at the rate of a 2048^3 f32
matmul timed in the same run (the three forward and six backward matmuls, 2 x M x D x F FLOPs each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from longcat_jax import Config
from longcat_jax.model.layers import swiglu
from longcat_jax.training.matmul_rate import matmul_rates


def autodiff_swiglu(x, w_gate, w_up, w_down):
    """The same forward, differentiated by JAX."""
    return jnp.einsum("...f,fd->...d", jax.nn.silu(x @ w_gate) * (x @ w_up), w_down)


def vjp_step(fn):
    return jax.jit(lambda dy, *args: jax.vjp(fn, *args)[1](dy))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default="", help="result file")
    a = p.parse_args(argv)
    cfg = Config.small()
    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (a.batch_size, a.seq_len, D))
    weights = [jax.random.normal(k, s) * 0.05 for k, s in zip(keys[1:4], [(D, F), (D, F), (F, D)])]
    dy = jax.random.normal(keys[4], x.shape)
    sides = {"hand-written backward (layers.swiglu)": vjp_step(swiglu),
             "JAX autodiff": vjp_step(autodiff_swiglu)}
    for f in sides.values():
        jax.block_until_ready(f(dy, x, *weights))
    times = {name: [] for name in sides}
    for _ in range(a.reps):
        for name, f in sides.items():
            t = time.perf_counter()
            jax.block_until_ready(f(dy, x, *weights))
            times[name].append(time.perf_counter() - t)
    flops = 9 * 2 * a.batch_size * a.seq_len * D * F
    rate = max(matmul_rates(2048, 5))
    result = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  jax=jax.__version__, cpu_count=os.cpu_count(),
                  shape=dict(M=a.batch_size * a.seq_len, D=D, F=F), flops=flops,
                  matmul_flops_per_s=rate, ideal_ms=1e3 * flops / rate,
                  median_ms={name: 1e3 * statistics.median(t) for name, t in times.items()})
    for name, ms in result["median_ms"].items():
        print(f"{name:40} {ms:7.1f} ms")
    print(f"at the matmul rate ({rate / 1e9:.0f} GFLOP/s): {result['ideal_ms']:.1f} ms; "
          f"M={a.batch_size * a.seq_len} D={D} F={F}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
