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
    OUT/tensorboard (and in a Weights & Biases run with --wandb), and notable events (skipped steps, restores,
    signals, bit flips) in OUT/events.log and on stderr."""

    def __init__(self, out_dir: str, resume: bool, wandb_project: str | None = None,
                 settings: dict | None = None, primary: bool = True):
        """primary=False (the other processes of a multi-process run): events are printed, nothing is
        written, so the run's files have one writer."""
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.primary = out_dir, primary
        mode = "a" if resume else "w"
        folder = out_dir if primary else None
        self._metrics = open(os.path.join(folder, "metrics.jsonl") if folder else os.devnull, mode)
        self._events = open(os.path.join(folder, "events.log") if folder else os.devnull, mode)
        self._tb = self._writer() if primary else None
        self._wandb = wandb_run(wandb_project, out_dir, settings or {}) if wandb_project and primary else None
        self._wandb_step = -1  # W&B takes each run's steps in increasing order only

    def _writer(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        return SummaryWriter(os.path.join(self.out_dir, "tensorboard"), purge_step=purge_step)

    def metrics(self, step: int, values: dict):
        row = {"step": int(step)}
        for k, v in values.items():
            v = np.asarray(v)
            row[k] = v.tolist() if v.ndim else (bool(v) if v.dtype == bool
                                                 else float(v) if v.dtype.kind == "f" else int(v))
        self._metrics.write(json.dumps(row, allow_nan=True) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for k, v in scalars.items():
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and step > self._wandb_step:
            self._wandb.log(scalars, step=int(step))
            self._wandb_step = int(step)

    def rewind(self, step: int):
        """The run goes on from `step` (a resume or a restore): metrics of later steps, which will be done
        again, leave metrics.jsonl and TensorBoard (tensorboardX's purge_step hides them), so the loss curve
        shows each step once. events.log keeps everything and records what was dropped."""
        if not self.primary:
            return
        path = os.path.join(self.out_dir, "metrics.jsonl")
        self._metrics.close()
        rows = read_metrics(self.out_dir)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) < len(rows):
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in kept)
            os.replace(path + ".tmp", path)
            dropped = sorted({r["step"] for r in rows if r["step"] > step})
            self.event(step, f"continuing from step {step}: dropped the logged metrics of steps "
                             f"{dropped[0]}-{dropped[-1]} (abandoned; they will be done again)")
            self._tb.close()
            self._tb = self._writer(purge_step=step + 1)
            if self._wandb is not None and self._wandb_step > step:
                self.event(step, f"Weights & Biases keeps the values it got for steps {step + 1}-"
                                 f"{self._wandb_step} (it takes no step twice); it resumes at step "
                                 f"{self._wandb_step + 1}")
        self._metrics = open(path, "a")

    def event(self, step: int, text: str):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: {text}"
        self._events.write(line + "\n")
        self._events.flush()
        print(line, flush=True)

    def close(self):
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        self._metrics.close()
        self._events.close()


def wandb_run(project: str, out_dir: str, settings: dict):
    """A Weights & Biases run for OUT, the same one again on --resume (its id is kept in OUT/wandb_run_id)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb: the wandb package is not installed (pip install wandb)") from None
    id_file = os.path.join(out_dir, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=out_dir, config=settings,
                      name=os.path.basename(os.path.abspath(out_dir)))


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
