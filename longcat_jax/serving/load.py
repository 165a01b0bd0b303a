"""What serve.py serves: a model, its config and tokenizer, from a Hugging Face folder, a training run's
checkpoint or a preset's random weights.

    cfg, model, tokenizer, name = load_for_serving(checkpoint="runs/default/checkpoints")
    run = load_run("runs/default")  # a run's newest good checkpoint: .cfg, .model, .tokenizer, .step, ...

A training run (train.py) leaves RUN/run_config.json (the preset), RUN/tokenizer.json and
RUN/checkpoints/STEP/ (orbax, a "state" item holding the whole TrainState). The model config is rebuilt as
training built it (`training.loop.build`: the tokenizer's vocabulary rounded up to a multiple of 128, EOS from
the tokenizer, BOS 1), and only the parameters are read back (orbax partial restore): the optimizer state,
twice the model's size with Muon/AdamW, never leaves the disk. A step is used only if it passes the run's
integrity check (`run_checkpoint.verify_step_dir`); with a checkpoints folder the newest good step is taken.

The weights stay in the dtype they are stored in; `dtype` picks the compute dtype (activations and the KV
cache). By default that is float32 on CPU, where XLA has no fast bfloat16 arithmetic on most CPUs and the
serving kernels read bfloat16 weights as they are (`pallas_kernels.cpu_serving`), and the source's own
elsewhere: a bfloat16 LongCat checkpoint served on CPU streams half the bytes of a float32 copy per decode
step and computes what that copy would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax

import longcat_jax as lj
from longcat_jax.serving.text import TextTokenizer

VOCAB_MULTIPLE = 128  # training rounds the embedding up to this (loop.build)
PRESET_BPE_MAX_VOCAB = 4096  # the --preset tokenizer: enough merges to look like text, trained in ~1 s
PRESET_BPE_TEXT_CHARS = 300_000
PRESET_MIN_VOCAB = 512
DTYPES = ("auto", "float32", "bfloat16")


class LoadError(RuntimeError):
    """Nothing to serve, or it cannot be read; the message is one line for the command line."""


def load_for_serving(*, hf: str | None = None, checkpoint: str | None = None, preset: str | None = None,
                     run: str = "runs/default", kernel_impl: str = "auto", dtype: str = "auto", seed: int = 0,
                     log: Callable[[str], object] = lambda s: print(s, file=sys.stderr)
                     ) -> tuple[lj.Config, lj.LongCat, TextTokenizer, str]:
    """(cfg, model, tokenizer, model_name) from one source; with none, the newest checkpoint of `run`.

    Args:
      hf: a Hugging Face LongCat folder (config.json, safetensors, tokenizer files).
      checkpoint: a training checkpoint: a step folder RUN/checkpoints/STEP, a RUN/checkpoints folder (its
        newest good step) or the run folder RUN itself.
      preset: random weights of a `Config.PRESETS` entry, with a small byte-level BPE.
      run: the run folder used when no source is given.
      kernel_impl: LSA / N-gram implementation (`Config.kernel_impl`).
      dtype: the compute dtype, one of DTYPES (see the module docstring); the weights keep theirs.
      seed: initialisation of the preset's random weights.
      log: where skipped (corrupt) checkpoint steps are reported.
    Raises:
      LoadError: nothing to serve or a source that cannot be read (the message says what to do).
    """
    if sum(x is not None for x in (hf, checkpoint, preset)) > 1:
        raise LoadError("give at most one of --hf, --checkpoint and --preset")
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    changes = {"kernel_impl": kernel_impl}
    if dtype != "auto" or jax.default_backend() == "cpu":
        changes["dtype"] = "float32" if dtype == "auto" else dtype
    if hf is not None:
        return _from_hf(hf, changes)
    if preset is not None:
        return _from_preset(preset, changes, seed)
    if checkpoint is None:
        ckpts = Path(run) / "checkpoints"
        if not _step_dirs(ckpts):
            raise LoadError(f"no checkpoint in {ckpts}: train one with `make train` (or `python train.py`), "
                            "or pass --hf DIR, --checkpoint DIR or --preset NAME")
        checkpoint = str(ckpts)
    return _from_checkpoint(checkpoint, changes, log)


def _from_hf(path: str, changes: dict):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoadError(f"--hf {path}: not a Hugging Face model folder (no config.json)")
    try:
        tokenizer = TextTokenizer.from_folder(path)
        cfg, model = lj.load_hf(path, **changes)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise LoadError(f"--hf {path}: {e}") from e
    return cfg, model, tokenizer, os.path.basename(os.path.normpath(path))


def preset_tokenizer(vocab_size: int) -> TextTokenizer:
    """A byte-level BPE of at most min(vocab_size, PRESET_BPE_MAX_VOCAB) tokens, trained on the first
    PRESET_BPE_TEXT_CHARS characters of the Python standard library's sources: deterministic, and enough for
    a random-weight server to speak text."""
    from longcat_jax.training import data  # grain and friends; only this source needs them

    texts, size = [], 0
    for path in sorted(data.stdlib_files()):
        texts += data.read_text_files([path])
        size += len(texts[-1])
        if size >= PRESET_BPE_TEXT_CHARS:
            break
    bpe = data.train_bpe(texts, min(vocab_size, PRESET_BPE_MAX_VOCAB))
    return TextTokenizer.from_tokenizer(bpe)


def _from_preset(name: str, changes: dict, seed: int):
    if name not in lj.Config.PRESETS:
        raise LoadError(f"unknown preset {name!r}; choose one of {', '.join(lj.Config.PRESETS)}")
    base = lj.Config.preset(name)
    # tiny's 256-token embedding cannot hold a byte-level BPE (256 bytes + 3 specials): it grows to 512
    tokenizer = preset_tokenizer(max(base.vocab_size, PRESET_MIN_VOCAB))
    vocab = max(base.vocab_size, _rounded(tokenizer.vocab_size))
    cfg = lj.Config.preset(name, vocab_size=vocab, eos_token_id=tokenizer.eos_token_ids[0], bos_token_id=1,
                           **changes)
    return cfg, lj.build_model(cfg, seed=seed), tokenizer, f"longcat-{name}"


def _rounded(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _step_dirs(folder: Path) -> list[Path]:
    """Step folders (integer names) of a checkpoints folder, newest first."""
    if not folder.is_dir():
        return []
    steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(steps, key=lambda p: -int(p.name))


def resolve_checkpoint(path: str, log: Callable[[str], object], *, flag: str = "--checkpoint"
                       ) -> tuple[Path, Path]:
    """(run folder, step folder) of a step folder, a checkpoints folder or a run folder; `flag` names the
    source in the errors."""
    from longcat_jax.training.run_checkpoint import verify_step_dir

    p = Path(path)
    if not p.is_dir():
        raise LoadError(f"{flag} {path}: no such folder")
    if p.name.isdigit() and (p / "state").is_dir():
        problem = verify_step_dir(p)
        if problem:
            raise LoadError(f"{flag} {path}: {problem}")
        return p.parent.parent, p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    steps = _step_dirs(p)
    if not steps:
        raise LoadError(f"{flag} {path}: no checkpoint steps in it (expected RUN/checkpoints/STEP)")
    for step in steps:
        problem = verify_step_dir(step)
        if problem is None:
            return p.parent, step
        log(f"checkpoint {step} is unusable ({problem}); trying an earlier one")
    raise LoadError(f"{flag} {path}: no step passes the integrity check")


class RunModel(NamedTuple):
    """A training run's checkpoint as `load_run` reads it."""

    cfg: lj.Config
    model: lj.LongCat
    tokenizer: TextTokenizer
    preset: str  # run_config.json's preset
    run_dir: Path
    step_dir: Path  # RUN/checkpoints/STEP

    @property
    def step(self) -> int:
        return int(self.step_dir.name)


def load_run(path: str, *, changes: dict | None = None,
             log: Callable[[str], object] = lambda s: print(s, file=sys.stderr),
             flag: str = "--checkpoint") -> RunModel:
    """The model, config and tokenizer of a train.py checkpoint (see the module docstring).

    Args:
      path: a step folder RUN/checkpoints/STEP, a RUN/checkpoints folder (its newest good step) or the run
        folder RUN itself.
      changes: Config fields to set (`kernel_impl`, the compute `dtype`); the rest as the run trained.
      log: where skipped (corrupt) checkpoint steps are reported.
      flag: the command-line option `path` came from, for the error messages.
    Raises:
      LoadError: no usable step, or a run folder / checkpoint that cannot be read.
    """
    import orbax.checkpoint as ocp
    from flax import nnx
    from tokenizers import Tokenizer

    from longcat_jax.training import data

    run, step = resolve_checkpoint(path, log, flag=flag)
    try:
        settings = json.loads((run / "run_config.json").read_text())
        bpe = Tokenizer.from_file(str(run / "tokenizer.json"))
    except Exception as e:  # OSError, ValueError, or the bare Exception of tokenizers
        raise LoadError(f"run folder {run}: needs run_config.json and tokenizer.json beside checkpoints/ "
                        f"({e})") from e
    preset = settings.get("preset", "tiny")
    changes = changes or {}
    if "model_config" in settings:  # the run's model as train.py resolved it (preset, overrides, dtype)
        cfg = dataclasses.replace(lj.Config(**settings["model_config"]), **changes)
    else:  # a run from before the model config was saved: the preset and the tokenizer say it all
        cfg = lj.Config.preset(preset, vocab_size=_rounded(bpe.get_vocab_size()),
                               eos_token_id=data.eos_id(bpe), bos_token_id=1, **changes)
    graphdef, abstract = nnx.split(lj.abstract_model(cfg))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device), target)
    try:
        restored = ocp.PyTreeCheckpointer().restore((step / "state").absolute(), args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    except Exception as e:  # orbax raises ValueError / TypeError / KeyError for a tree that does not fit
        raise LoadError(f"checkpoint {step}: cannot restore the parameters of preset {preset!r} with a "
                        f"vocabulary of {cfg.vocab_size} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                        ) from e
    model = nnx.merge(graphdef, restored["params"])
    return RunModel(cfg, model, TextTokenizer.from_tokenizer(bpe), preset, run, step)


def _from_checkpoint(path: str, changes: dict, log: Callable[[str], object]):
    run = load_run(path, changes=changes, log=log)
    return run.cfg, run.model, run.tokenizer, f"longcat-{run.preset}-{run.run_dir.name}"
