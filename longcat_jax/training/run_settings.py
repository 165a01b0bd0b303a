"""A run's settings: read from a config file and model overrides, saved on disk, checked on resume, and
warm-up lengths that fit the run.

A run's settings are train.py's flags (each typed and checked by argparse) plus `model`, overrides of the
model config's fields on top of the preset (`model.num_layers=6` on the command line). `--config FILE` (JSON,
or YAML for .yaml/.yml) gives any of them, in the flags' names; the command line overrides the file.
`train.py` writes its settings, and the model config they resolve to, to OUT/run_config.json when a run
starts; that file is itself a valid --config file. `--resume` reads them back and
refuses a setting that would change what the run computes (its data, tokenizer, model, optimizer or schedule)
unless `--allow-change` names it: a resumed run continues the run it claims to, or says it does not.
`--eval-only` on a run takes the run's saved settings for those not given on its command line
(`take_saved`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing

import longcat_jax as lj
from longcat_jax.model import pipeline

SETTINGS_FILE = "run_config.json"

# The settings that define what a run computes. The others (mesh, checkpoint cadence, logging, guards, memory
# policies) may change between a run and its resumption.
DEFINING = (
    "preset", "data", "tokenizer", "vocab_size", "seq_len", "batch_size", "steps", "seed", "lr",
    "warmup_steps", "schedule", "optimizer", "mtp_weight", "z_loss", "indexer_weight", "indexer_warmup_steps",
    "balance_weight", "bias_update_rate", "kernel_impl", "init_from", "capacity_factor", "model", "dtype",
)

# Settings of one invocation, not of a run: a --config file (another run's run_config.json, say) does not
# carry them over. `model_config` is derived (the preset with the overrides), saved for readers.
PER_INVOCATION = ("out", "resume", "eval_only", "allow_change", "config", "inject_fault", "profile_steps",
                  "coordinator", "num_processes", "process_id")
DERIVED = ("model_config",)

# Model config fields that the run sets from elsewhere, so a `model.` override may not.
SET_ELSEWHERE = {"vocab_size": "the tokenizer (--tokenizer, --vocab-size)", "eos_token_id": "the tokenizer",
                 "bos_token_id": "the tokenizer", "pad_token_id": "the tokenizer",
                 "kernel_impl": "--kernel-impl", "capacity_factor": "--capacity-factor", "dtype": "--dtype"}

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


def describe_pipeline(stages: int, microbatches: int) -> str:
    """The start-up line of a pipelined run: its stages, microbatches and bubble."""
    bubble = pipeline.bubble_fraction(stages, microbatches)
    return (f"pipeline: {stages} stages, {microbatches} microbatches: bubble {bubble:.0%} of stage time "
            "((stages - 1) / (microbatches + stages - 1))")


def read_config_file(path: str) -> dict:
    """The settings in a --config file: a JSON or YAML mapping of setting names to values."""
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                settings = yaml.safe_load(f)
            else:
                settings = json.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
        raise ValueError(f"--config {path}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting names to values")
    return settings


def config_file_argv(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """The command line a --config file stands for: each setting as its own flag (and `model` as
    `model.FIELD=VALUE` overrides), so that argparse checks its type and choices exactly as on the command
    line, and the real command line, parsed after it, wins. Returns (argv, the per-invocation settings the
    file held and that were left out)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv, skipped = [], []
    for key, value in read_config_file(path).items():
        if key in PER_INVOCATION:
            if value not in (None, False, [], ""):
                skipped.append(key)
            continue
        if key in DERIVED or value is None:
            continue
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"--config {path}: `model` must map model config fields to values")
            argv += [f"model.{k}={_text(v)}" for k, v in value.items()]
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--config {path}: unknown setting {key!r}{hint}")
        action = actions[key]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], _text(value)]
    return argv, skipped


def model_overrides(items: list[str]) -> dict:
    """`model.FIELD=VALUE` items as {field: value}, each value parsed as its field's type (int, float, bool
    `true`/`false`, a choice, `none` where the field allows it). A ValueError names a bad item."""
    hints = typing.get_type_hints(lj.Config)
    fields = [f.name for f in dataclasses.fields(lj.Config)]
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not key.startswith("model.") or not sep:
            raise ValueError(f"{item!r}: expected a flag or a model override model.FIELD=VALUE")
        name = key[len("model."):]
        if name in SET_ELSEWHERE:
            raise ValueError(f"{key}: set by {SET_ELSEWHERE[name]}, not as a model override")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ValueError(f"{key}: the model config has no field {name!r}"
                             + (f" (did you mean model.{close[0]}?)" if close else ""))
        out[name] = _parse_as(text, hints[name], item)
    return out


def _parse_as(text: str, kind, item: str):
    options = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        (kind,) = [o for o in options if o is not type(None)]
        options = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Literal:
        if text not in options:
            raise ValueError(f"{item}: expected one of {', '.join(options)}")
        return text
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{item}: expected true or false")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{item}: expected {'an integer' if kind is int else 'a number'}") from None


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def current(args, cfg: lj.Config | None = None) -> dict:
    """The settings to save: every command-line value, with paths made absolute, and the model config."""
    out = {k: v for k, v in vars(args).items() if k not in ("fault", "mesh_sizes", "overrides")}
    if cfg is not None:
        out["model_config"] = dataclasses.asdict(cfg)
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
            flag = "model overrides" if key == "model" else "--" + key.replace("_", "-")
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


def save(args, cfg: lj.Config):
    """OUT/run_config.json, written atomically."""
    path = os.path.join(args.out, SETTINGS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(current(args, cfg), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _shown(value) -> str:
    return "(default)" if value is None else str(value)
