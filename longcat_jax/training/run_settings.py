"""A run's settings on disk, the check a resumed run passes, and warm-up lengths that fit the run.

`train.py` writes its settings to OUT/run_config.json when a run starts. `--resume` reads them back and
refuses a setting that would change what the run computes (its data, tokenizer, model, optimizer or schedule)
unless `--allow-change` names it: a resumed run continues the run it claims to, or says it does not.
`--eval-only` on a run takes the run's saved settings for those not given on its command line
(`take_saved`).
"""

from __future__ import annotations

import argparse
import json
import os

SETTINGS_FILE = "run_config.json"

# The settings that define what a run computes. The others (mesh, checkpoint cadence, logging, guards, memory
# policies) may change between a run and its resumption.
DEFINING = (
    "preset", "data", "tokenizer", "vocab_size", "seq_len", "batch_size", "steps", "seed", "lr",
    "warmup_steps", "schedule", "optimizer", "mtp_weight", "z_loss", "indexer_weight", "indexer_warmup_steps",
    "balance_weight", "bias_update_rate", "kernel_impl", "init_from", "capacity_factor",
)

# Warm-ups left at their defaults: this many steps, but at most this share of the run, so that a short run
# still decays its learning rate and reaches the sparse stage.
DEFAULT_WARMUP = {"warmup_steps": (50, 0.1), "indexer_warmup_steps": (50, 0.25)}


def steps_or_fraction(text: str) -> float:
    """argparse type of a warm-up length: a whole number of steps, or a fraction in (0, 1) of the run."""
    try:
        value = float(text)
    except ValueError:
        message = f"expected a number of steps or a fraction of the run, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 0 or a fraction in (0, 1), "
                                         f"got {text!r}")
    return int(value) if value.is_integer() else value


def resolve_warmup(name: str, value: float | None, steps: int) -> int:
    """The warm-up length in steps: a default capped to its share of the run, a fraction of the run, or a
    number of steps capped to the run (the learning-rate warm-up ends by the last step)."""
    limit = steps - 1 if name == "warmup_steps" else steps
    if value is None:
        most, share = DEFAULT_WARMUP[name]
        return max(min(most, int(share * steps)), 0 if name == "indexer_warmup_steps" else min(1, limit))
    if 0 < value < 1:
        return min(round(value * steps), limit)
    return min(int(value), limit)


def describe_schedule(args, warmup: int, indexer_warmup: int) -> str:
    """The start-up line: the schedule in steps."""
    decay = {"cosine": "cosine decay", "wsd": "constant, then a linear decay (WSD)"}[args.schedule]
    text = (f"schedule: {args.steps} steps; learning rate warm-up {warmup} steps, then {decay} to step "
            f"{args.steps}")
    if indexer_warmup >= args.steps:
        return text + f"; dense attention for the whole run (indexer warm-up {indexer_warmup} steps)"
    if indexer_warmup:
        return text + f"; dense indexer warm-up steps 1-{indexer_warmup}, sparse attention from step " \
                      f"{indexer_warmup + 1}"
    return text + "; sparse attention from step 1"


def current(args) -> dict:
    """The settings to save: every command-line value, with paths made absolute."""
    out = {k: v for k, v in vars(args).items() if k not in ("fault", "mesh_sizes")}
    for key in ("data", "tokenizer", "out", "init_from"):
        if out.get(key):
            out[key] = os.path.abspath(out[key])
    return out


def check_resume(args) -> str | None:
    """None if resuming OUT with `args` continues the same run, else a one-line reason naming the setting."""
    path = os.path.join(args.out, SETTINGS_FILE)
    if not os.path.exists(path):
        return None  # a run from before the settings were saved: nothing to compare
    with open(path) as f:
        saved = json.load(f)
    now = current(args)
    allowed = set(args.allow_change or ())
    for key in DEFINING:
        if key in saved and saved[key] != now.get(key) and key not in allowed:
            flag = "--" + key.replace("_", "-")
            return (f"--resume: {args.out} was started with {flag} {_shown(saved[key])}, not "
                    f"{_shown(now.get(key))}; pass --allow-change {key.replace('_', '-')} to continue it "
                    "with the new value")
    return None


# What --eval-only takes from the run it evaluates when the command line does not say: the settings that
# make its model, tokenizer and held-out batches (--init-from aside: the run's own checkpoint is evaluated).
EVAL_SETTINGS = tuple(k for k in DEFINING if k != "init_from") + ("eval_batches",)


def take_saved(args, given: set[str]) -> list[str]:
    """Set each of EVAL_SETTINGS that is not in `given` (the flags on the command line) to its value in
    OUT/run_config.json; returns the names set. Nothing when the run saved no settings."""
    path = os.path.join(args.out, SETTINGS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    taken = [k for k in EVAL_SETTINGS if k not in given and k in saved and hasattr(args, k)]
    for k in taken:
        setattr(args, k, saved[k])
    return taken


def save(args):
    with open(os.path.join(args.out, SETTINGS_FILE), "w") as f:
        json.dump(current(args), f, indent=2, sort_keys=True)


def _shown(value) -> str:
    return "(default)" if value is None else str(value)
