"""Context parallelism's memory: one long-sequence training step of the `small` preset compiled for one
device and for cp simulated CPU devices, with XLA's memory analysis per device
(docs/architecture.md#context-parallel).

The step is the loss and gradient of `train_step.compute_loss` (forward with MTP and the indexer terms, the
fused LM-head loss) over one row of --seq-len tokens, on the kernel path (`kernel_impl="xla"`: selection and
sparse attention in linear memory; the reference path forms [T, T] scores) in float32. It is compiled, never
run: `compiled.memory_analysis()` gives the bytes one device holds, as arguments (parameters and the batch),
outputs (loss terms and gradients, the size of the parameters) and temporaries (activations and scratch). The
parameters are replicated over cp, so arguments and outputs stay; the temporaries, which grow with T, are the
part context parallelism splits. The compiled cp program is also searched for its all-gathers.

Usage:
  python bench/context_parallel_memory.py [--seq-len 32768] [--cp 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768, help="tokens in the one row of the batch")
    p.add_argument("--cp", type=int, default=8, help="simulated devices the sequence is split over")
    p.add_argument("--json", default=os.path.join(HERE, "results", "context_parallel_memory.json"))
    return p.parse_args(argv)


ARGS = parse_args()
# Before jax starts: the simulated CPU devices.
DEVICES = f" --xla_force_host_platform_device_count={ARGS.cp}"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + DEVICES

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))

from longcat_jax import Config, abstract_model  # noqa: E402
from longcat_jax.training.train_step import LossSettings, compute_loss  # noqa: E402
from sharding.divisibility import resolve_shardings  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

GIB = 2**30


def compile_step(cfg: Config, T: int, mesh):
    """The compiled loss-and-gradient step over one row of T tokens: on one device (mesh None) or with the
    parameters placed by the rules on `mesh` and the batch split along the sequence."""
    graphdef, state = nnx.split(abstract_model(cfg))
    if mesh is None:
        params, token_sharding = state, None
    else:
        specs = iter(resolve_shardings(state, mesh))

        def placed(var):
            value, sharding = var.get_value(), NamedSharding(mesh, P(*next(specs).spec))
            return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

        params = jax.tree.map(placed, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        token_sharding = NamedSharding(mesh, P(None, "cp"))
    ints = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=token_sharding)
    batch = {"inputs": ints, "targets": ints, "positions": ints, "segment_ids": ints,
             "loss_mask": jax.ShapeDtypeStruct((1, T), jnp.float32, sharding=token_sharding)}
    step = jax.jit(jax.value_and_grad(compute_loss, has_aux=True), static_argnums=(1, 3, 4))
    start = time.perf_counter()
    if mesh is None:
        compiled = step.lower(params, graphdef, batch, cfg, LossSettings()).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = step.lower(params, graphdef, batch, cfg, LossSettings()).compile()
    return compiled, time.perf_counter() - start


def memory(compiled, seconds: float) -> dict:
    m = compiled.memory_analysis()
    sizes = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                 temporaries=m.temp_size_in_bytes)
    return dict(bytes_per_device={**sizes, "total": sum(sizes.values())}, compile_seconds=round(seconds, 1))


def all_gathers(hlo: str) -> dict[str, int]:
    """How many all-gathers of each result shape the compiled program holds."""
    counts: dict[str, int] = {}
    for shape in re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", hlo):
        counts[shape] = counts.get(shape, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> int:
    T, cp = ARGS.seq_len, ARGS.cp
    cfg = Config.small(kernel_impl="xla")
    result = dict(
        command="python bench/context_parallel_memory.py " + " ".join(sys.argv[1:]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                     devices=len(jax.devices())),
        settings=dict(preset="small", kernel_impl=cfg.kernel_impl, dtype=cfg.dtype, batch=1, seq_len=T,
                      cp=cp),
        steps={})
    one, seconds = compile_step(cfg, T, None)
    result["steps"]["1 device"] = memory(one, seconds)
    split, seconds = compile_step(cfg, T, make_mesh({"cp": cp}))
    result["steps"][f"cp={cp}"] = {**memory(split, seconds), "all_gathers": all_gathers(split.as_text())}
    base, cp_row = (result["steps"][k]["bytes_per_device"] for k in ("1 device", f"cp={cp}"))
    result["ratio_cp_to_1_device"] = {k: round(cp_row[k] / base[k], 4) for k in ("temporaries", "total")}

    print(f"small preset, one row of {T} tokens, loss + gradients, kernel_impl=xla, float32 (GiB per device)")
    print(f"{'':10} {'arguments':>10} {'outputs':>10} {'temporaries':>12} {'total':>10}")
    for name, row in result["steps"].items():
        b = row["bytes_per_device"]
        print(f"{name:10} {b['arguments'] / GIB:10.3f} {b['outputs'] / GIB:10.3f} "
              f"{b['temporaries'] / GIB:12.3f} {b['total'] / GIB:10.3f}")
    r = result["ratio_cp_to_1_device"]
    print(f"cp={cp} / 1 device: temporaries {r['temporaries']:.3f} (1/cp = {1 / cp:.3f}), "
          f"total {r['total']:.3f}")
    print(f"all-gathers in the cp={cp} step: {result['steps'][f'cp={cp}']['all_gathers']}")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
