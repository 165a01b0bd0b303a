"""Each parallel axis on 8 simulated CPU devices against 1 device: the training step of `train.py`, the same
global batch, per-device memory from XLA's memory analysis, the collectives the compiled step holds, and step
time.

Every layout is `train.py`'s own step (`longcat_jax.training.loop.build`: the model, ZeRO-1 optimizer state,
the jitted `train_step`) on the tiny preset made divisible by 8 where an axis needs it (8 heads, 8 routed
experts, 4 layers), on the built-in corpus. For each layout the step is compiled once; `memory_analysis()`
gives the bytes one device holds (arguments = parameters, optimizer state and batch; outputs; temporaries),
and the compiled HLO is searched for all-to-all, collective-permute, all-gather, all-reduce and
reduce-scatter. Then --steps steps run after one warm-up step, and the median is reported.

The 8 devices are simulated on this machine's cores, so step times say little about real hardware (they
share 2 cores); memory per device and the collectives are the point.

Usage:
  python bench/parallel.py [--steps N] [--batch-size B] [--seq-len T] [--layouts 'NAME;...'] [--json PATH]
"""

from __future__ import annotations

import os

# Before jax starts: 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import train  # noqa: E402
from longcat_jax.training import loop  # noqa: E402
from longcat_jax.training.corpus import load_data  # noqa: E402
from longcat_jax.training.run_checkpoint import RunCheckpointer  # noqa: E402

# The tiny preset with every axis divisible by 8 where a layout splits it.
MODEL = ["model.num_heads=8", "model.n_routed_experts=8", "model.num_layers=4"]

# name -> extra train.py flags. Each uses all 8 devices.
LAYOUTS = {
    "1 device": [],
    "dp=8 (ZeRO-1)": ["--mesh", "dp=8"],
    "dp=8 FSDP": ["--mesh", "dp=8", "--fsdp"],
    "tp=8": ["--mesh", "tp=8"],
    "ep=8": ["--mesh", "ep=8"],
    "pp=4, 4 microbatches, dp=2": ["--mesh", "pp=4,dp=2", "--microbatches", "4"],
    "cp=8": ["--mesh", "cp=8"],
    "vp=8": ["--mesh", "vp=8"],
    "dp=2,ep=2,tp=2": ["--mesh", "dp=2,ep=2,tp=2"],
    "pp=2,cp=2,vp=2": ["--mesh", "pp=2,cp=2,vp=2", "--microbatches", "2"],
}

COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")


def collective_counts(hlo: str) -> dict[str, int]:
    """How many instructions of each collective kind the compiled program holds (start ops of async pairs
    counted once)."""
    lines = [line for line in hlo.splitlines() if re.match(r"\s*(?:ROOT )?%[\w.\-]+ = ", line)]
    return {kind: sum(bool(re.search(rf" {kind}(?:-start)?\(", line)) for line in lines)
            for kind in COLLECTIVES}


def bench_layout(name: str, flags: list[str], common: list[str], steps: int, corpus) -> dict:
    out = tempfile.mkdtemp(prefix="bench_parallel_")
    args = train.parse_args(["--out", out, *common, *flags, *MODEL])
    ckpt = RunCheckpointer(os.path.join(out, "checkpoints"), keep=1, save_every=10**9, log=lambda s: None)
    try:
        built, state = loop.build(args, corpus, ckpt)
        with loop._mesh_context(built.mesh):
            batch = built.to_device(next(corpus.train_iter))
            kwargs = dict(nan_fault_step=jax.numpy.int32(-1), flip_fault_step=jax.numpy.int32(-1),
                          dense_attention=False, measure_recall=False)
            t = time.perf_counter()
            compiled = built.step_fn.lower(state, batch, **kwargs).compile()
            compile_s = time.perf_counter() - t
            mem = compiled.memory_analysis()
            counts = collective_counts(compiled.as_text())
            times, losses = [], []
            for i in range(steps + 1):
                batch = built.to_device(next(corpus.train_iter))
                t = time.perf_counter()
                state, metrics, _ = built.step_fn(state, batch, **kwargs)
                losses.append(float(metrics["loss"]))
                if i:  # the first call runs the program compiled above after loading it; not timed
                    times.append(time.perf_counter() - t)
    finally:
        ckpt.close()
    step_s = statistics.median(times)
    row = dict(flags=flags, compile_s=compile_s, step_s=step_s,
               tokens_per_s=args.batch_size * args.seq_len / step_s, losses=losses,
               bytes_per_device=dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                                     temporaries=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes),
               collectives=counts)
    b = row["bytes_per_device"]
    row["bytes_per_device"]["total"] = b["arguments"] + b["outputs"] + b["temporaries"] - b["aliased"]
    print(f"{name:28s} {step_s * 1e3:8.0f} ms/step  {row['tokens_per_s']:8.0f} tok/s  "
          f"{b['total'] / 2**20:7.1f} MiB/device  " + ", ".join(f"{k} {v}" for k, v in counts.items() if v),
          flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layouts", default=";".join(LAYOUTS),
                   help="names separated by ';', of: " + "; ".join(LAYOUTS))
    p.add_argument("--json", default=os.path.join(HERE, "results", "parallel_cpu.json"))
    a = p.parse_args(argv)
    names = [n.strip() for n in a.layouts.split(";") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"unknown layouts {unknown}; choose from {'; '.join(LAYOUTS)}")
    common = ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", "1000",
              "--no-progress", "--no-compile-cache", "--indexer-warmup-steps", "0"]
    result = dict(
        command="python bench/parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                     devices=len(jax.devices())),
        settings=dict(batch_size=a.batch_size, seq_len=a.seq_len, steps=a.steps, model=MODEL),
        layouts={})
    # One corpus for every layout (the flags that shape it are common): its batches continue across layouts.
    corpus = load_data(train.parse_args(["--out", tempfile.mkdtemp(prefix="bench_parallel_"), *common]))
    for name in names:
        result["layouts"][name] = bench_layout(name, LAYOUTS[name], common, a.steps, corpus)
        base = result["layouts"].get("1 device")
        if base:
            row = result["layouts"][name]
            row["memory_vs_1_device"] = row["bytes_per_device"]["total"] / base["bytes_per_device"]["total"]
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
