"""What a training run writes for people: metrics.jsonl, TensorBoard events, events.log and
a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


class RunLog:
    """One JSON object per line in OUT/metrics.jsonl, the same scalars as TensorBoard events in
    OUT/tensorboard, and notable events (skipped steps, restores, signals, bit flips) in OUT/events.log
    and on stderr."""

    def __init__(self, out_dir: str, resume: bool):
        from tensorboardX import SummaryWriter

        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        mode = "a" if resume else "w"
        self._metrics = open(os.path.join(out_dir, "metrics.jsonl"), mode)
        self._events = open(os.path.join(out_dir, "events.log"), mode)
        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def metrics(self, step: int, values: dict):
        row = {"step": int(step)}
        for k, v in values.items():
            v = np.asarray(v)
            row[k] = v.tolist() if v.ndim else (bool(v) if v.dtype == bool
                                                 else float(v) if v.dtype.kind == "f" else int(v))
        self._metrics.write(json.dumps(row, allow_nan=True) + "\n")
        self._metrics.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def event(self, step: int, text: str):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: {text}"
        self._events.write(line + "\n")
        self._events.flush()
        print(line, flush=True)

    def close(self):
        self._tb.close()
        self._metrics.close()
        self._events.close()


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(out_dir: str, path: str | None = None) -> str:
    """Training CE (and held-out loss where measured) against step, as OUT/loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir)
    train = [(r["step"], r["ce"]) for r in rows if "ce" in r and math.isfinite(r["ce"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train cross-entropy", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = path or os.path.join(out_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def phase(text: str):
    """A start-up phase, on stderr as it begins or ends, so a long load or compile is never silent."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)
