"""Does bf16 compute train as well as f32? The same `train.py` run twice, `--dtype float32` and `--dtype
bfloat16` (parameters and optimizer state float32 in both), same data, seed and schedule; their training CE
and held-out losses side by side.

Writes bench/results/bf16_curve.json and .png. The runs go to --workdir (their own run folders).

Usage:
  python bench/bf16_curve.py [--steps 200] [--preset tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DTYPES = ("float32", "bfloat16")


def run(dtype: str, args, out: str) -> dict:
    cmd = [sys.executable, "train.py", "--out", out, "--preset", args.preset, "--steps", str(args.steps),
           "--dtype", dtype, "--eval-every", str(args.eval_every), "--sample-tokens", "0", "--no-progress",
           "--save-every", str(args.steps)]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return dict(seconds=seconds, tokens_per_sec=summary["tokens_per_sec"],
                ce=[(r["step"], r["ce"]) for r in rows if "ce" in r],
                eval_loss=[(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--workdir", default="", help="where the two run folders go (default: a temporary one)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "bf16_curve.json"))
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bf16_curve_")
    result = {"settings": vars(args), "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
    for dtype in DTYPES:
        result[dtype] = run(dtype, args, os.path.join(work, dtype))
    f32, bf16 = result["float32"]["eval_loss"], result["bfloat16"]["eval_loss"]
    result["held_out_final"] = {"float32": f32[-1][1], "bfloat16": bf16[-1][1],
                                "difference": bf16[-1][1] - f32[-1][1]}
    for dtype in DTYPES:
        r = result[dtype]
        print(f"{dtype:9s} held-out {r['eval_loss'][0][1]:.3f} -> {r['eval_loss'][-1][1]:.3f}  "
              f"{r['tokens_per_sec']:.0f} tokens/s  ({r['seconds']:.0f} s with compiles)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, os.path.splitext(args.json)[0] + ".png")
    print(f"wrote {args.json}")
    return 0


def _plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for dtype, color in zip(DTYPES, ("C0", "C1"), strict=True):
        ax.plot(*zip(*result[dtype]["ce"], strict=True), color=color, lw=0.8, alpha=0.7,
                label=f"train CE, {dtype}")
        ax.plot(*zip(*result[dtype]["eval_loss"], strict=True), "o-", color=color, label=f"held-out, {dtype}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{result['settings']['preset']} preset: bf16 compute against f32")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
