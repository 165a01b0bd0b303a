"""Where a run's starting weights come from, and --eval-only.

The run's model (`model_config`); `--init-from
PATH` (a Hugging Face folder, an Orbax folder of `longcat_jax.convert` or a train.py run): what PATH holds
(`init_source_kind`), its tokenizer (`init_source_tokenizer`) and its weights, refused with a one-line
`SettingError` when they do not fit the run (`load_init_weights`, `model_differences`); and `evaluate`,
the held-out loss of OUT's newest good checkpoint (or of the --init-from weights), training nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
from flax import nnx

import longcat_jax as lj

if TYPE_CHECKING:
    from longcat_jax.training.corpus import Data


class SettingError(ValueError):
    """A setting that cannot work (a source of weights that does not fit the run); one line for stderr."""



def model_config(args, corpus: Data) -> lj.Config:
    """The run's model: the preset with the `model.` overrides, the tokenizer's vocabulary rounded up to a
    multiple of 128, its EOS, BOS 1, --dtype, --kernel-impl and --capacity-factor (saved whole in
    run_config.json, from which serving and export rebuild it)."""
    vocab = -(-corpus.tokenizer.get_vocab_size() // 128) * 128
    return lj.Config.preset(args.preset, **args.model, vocab_size=vocab, eos_token_id=corpus.eos,
                            bos_token_id=1, dtype=args.dtype, kernel_impl=args.kernel_impl,
                            capacity_factor=args.capacity_factor)


# --- Weights from elsewhere: --init-from, --eval-only -------------------------------------------------------

# Config fields that say how a run computes or which token ids it names, not what its weights are: a source of
# weights may differ in these (the run's values are used). Every other field must match.
RUN_SIDE_FIELDS = ("kernel_impl", "capacity_factor", "expected_real_experts", "bos_token_id", "eos_token_id",
                   "pad_token_id", "dtype", "param_dtype")


def init_source_kind(path: str, flag: str = "--init-from") -> str:
    """What PATH holds: "hf" (config.json + *.safetensors), "orbax" (config.json + params/, as
    `python -m longcat_jax.convert --hf .. --out ORBAX` writes it) or "run" (a train.py run folder, its
    checkpoints/ folder or one step folder). A ValueError with a one-line message for anything else."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{flag} {path}: not a folder")
    if (p / "config.json").is_file():
        if (p / "params").is_dir():
            return "orbax"
        if any(p.glob("*.safetensors")):
            return "hf"
        raise ValueError(f"{flag} {path}: has config.json but neither params/ (an Orbax checkpoint) nor "
                         "*.safetensors (a Hugging Face folder)")
    if (p / "checkpoints").is_dir() or (p / "state").is_dir() or any(
            c.name.isdigit() and c.is_dir() for c in p.iterdir()):
        return "run"
    raise ValueError(f"{flag} {path}: not a Hugging Face folder (config.json + *.safetensors), an Orbax "
                     "checkpoint (config.json + params/) or a train.py run (checkpoints/)")


def init_source_tokenizer(path: str, kind: str) -> str | None:
    """The tokenizer.json that comes with a source of weights: a run's own, or a Hugging Face folder's."""
    p = Path(path)
    if kind == "run":
        if (p / "state").is_dir():  # RUN/checkpoints/STEP
            p = p.parent.parent
        elif not (p / "checkpoints").is_dir():  # RUN/checkpoints
            p = p.parent
    candidate = p / "tokenizer.json"
    return str(candidate) if kind in ("run", "hf") and candidate.is_file() else None


def load_init_weights(path: str, cfg: lj.Config, tokenizer, preset: str, flag: str = "--init-from"
                      ) -> tuple[dict, str]:
    """The model state (a pure dict of arrays) of a source of weights (`init_source_kind`) that fits the model
    `cfg`, and a description of where it came from.

    Raises:
      SettingError: the source cannot be read, its model differs from `cfg` in a field other than
        RUN_SIDE_FIELDS (the message names each differing field), or a run's tokenizer is not `tokenizer`.
    """
    from tokenizers import Tokenizer

    from longcat_jax.serving.load import LoadError, load_run

    kind = init_source_kind(path, flag)
    run_label = f"this run's (--preset {preset}, vocabulary {cfg.vocab_size} from the tokenizer)"
    if kind == "run":
        try:
            source = load_run(path, flag=flag, log=lambda s: print(s, file=sys.stderr))
        except LoadError as e:
            raise SettingError(str(e)) from e
        _check_same_model(f"{flag} {path}", source.cfg, cfg, run_label)
        own = source.run_dir / "tokenizer.json"
        if Tokenizer.from_file(str(own)).get_vocab() != tokenizer.get_vocab():
            raise SettingError(f"{flag} {path}: its tokenizer {own} is not this run's (--tokenizer); the "
                               "weights need the vocabulary they were trained with")
        model, where = source.model, f"step {source.step} of {source.run_dir}"
    else:
        from longcat_jax.hf.config import config_from_hf

        try:
            with open(os.path.join(path, "config.json")) as f:
                source_cfg = config_from_hf(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SettingError(f"{flag} {path}: cannot read config.json ({type(e).__name__}: {e})") from e
        _check_same_model(f"{flag} {path}", source_cfg, cfg, run_label)
        try:
            if kind == "hf":
                model, where = lj.load_hf(path)[1], f"the Hugging Face folder {path}"
            else:
                from longcat_jax.convert import load_orbax

                model, where = load_orbax(path)[1], f"the Orbax checkpoint {path}"
        except (OSError, ValueError, KeyError, AssertionError) as e:
            raise SettingError(f"{flag} {path}: cannot load the weights ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from e
    return nnx.to_pure_dict(nnx.state(model)), where


def model_differences(source: lj.Config, cfg: lj.Config) -> list[str]:
    """'field SOURCE (this run: RUN)' for each Config field (RUN_SIDE_FIELDS aside) in which they differ."""
    out = []
    for field in dataclasses.fields(cfg):
        a, b = getattr(source, field.name), getattr(cfg, field.name)
        if field.name in RUN_SIDE_FIELDS or a == b:
            continue
        if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9):
            continue
        out.append(f"{field.name} {a} (this run: {b})")
    return out


def _check_same_model(what: str, source: lj.Config, cfg: lj.Config, run_label: str):
    diffs = model_differences(source, cfg)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise SettingError(f"{what}: its model differs from {run_label}: {shown}")


def place_weights(params: nnx.State, weights: dict):
    """Put `weights` (as `load_init_weights` returns them) into `params`, each array on the sharding and in
    the dtype of the one it replaces."""
    live = nnx.to_pure_dict(params)

    def place(x, w):
        if tuple(w.shape) != tuple(x.shape):
            raise SettingError(f"--init-from: a weight of shape {tuple(w.shape)} where the model has "
                               f"{tuple(x.shape)}")
        return jax.device_put(w if w.dtype == x.dtype else w.astype(x.dtype), x.sharding)

    try:
        placed = jax.tree.map(place, live, weights)
    except ValueError as e:
        if isinstance(e, SettingError):
            raise
        raise SettingError(f"--init-from: the weights do not have this model's parameters ({e})") from e
    nnx.replace_by_pure_dict(params, placed)


def evaluate(args) -> int:
    """--eval-only: the held-out loss of OUT's newest good checkpoint (or of the --init-from weights) over
    --eval-batches batches, printed as one line and written to OUT/eval.json. Trains nothing, saves no
    checkpoint and leaves run_config.json alone. Returns 0, or 2 on a setting or data error (one line)."""
    # loop imports this module at its top, so its run helpers are imported here, at call time.
    from longcat_jax.training.corpus import load_data
    from longcat_jax.training.loop import (
        _held_out_loss_fn,
        _mesh_context,
        _model,
        _to_device_fn,
    )
    from longcat_jax.training.run_log import phase

    source, flag = (args.init_from, "--init-from") if args.init_from else (args.out, "--out")
    try:
        corpus = load_data(args)
        cfg = model_config(args, corpus)
        weights, where = load_init_weights(source, cfg, corpus.tokenizer, args.preset, flag=flag)
        mesh, graphdef, params = _model(args, cfg, weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    phase(f"evaluating {where} on {len(corpus.eval_batches)} held-out batches")
    with _mesh_context(mesh):
        loss = _held_out_loss_fn(graphdef, corpus, _to_device_fn(mesh))(params)
    tokens = int(sum(float(b["loss_mask"].sum()) for b in corpus.eval_batches))
    result = {"held_out_loss": loss, "source": os.path.abspath(source), "weights": where,
              "eval_batches": len(corpus.eval_batches), "eval_tokens": tokens}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    n = len(corpus.eval_batches)
    print(f"held-out loss {loss:.4f} ({where}; {n} batch{'es' if n != 1 else ''}, {tokens:,} tokens)",
          flush=True)
    return 0
