"""Convert between Hugging Face folders and Orbax checkpoints, and export training runs.

    python -m longcat_jax.convert --hf HF_DIR --out ORBAX_DIR            # HF safetensors -> Orbax
    python -m longcat_jax.convert --orbax ORBAX_DIR --out HF_DIR --to-hf  # Orbax -> HF safetensors
    python -m longcat_jax.convert --run RUN_DIR --out HF_DIR             # train.py run -> HF folder

An Orbax checkpoint here is a folder with `config.json` (the HF config, which round-trips our Config exactly)
and `params/` (the model state written by orbax's StandardCheckpointer, which commits atomically: a crash
never leaves a half-written `params/` that restores).

`--run` takes what `python train.py --out RUN_DIR` leaves (run_config.json, tokenizer.json,
checkpoints/STEP/) and exports the newest step that passes the run's integrity check (or the step folder or
checkpoints folder given), read as `serve.py --checkpoint` reads it (`serving.load.load_run`). The folder
holds config.json and the safetensors (`save_hf`), a generation_config.json with the BOS / EOS / pad ids (the
keys transformers' `GenerationConfig.save_pretrained` writes) and the run's BPE as a tokenizer folder
(`serving.text.save_tokenizer_folder`: `<s>`, `</s>`, `<pad>` named, the default chat template), so
`AutoTokenizer`, `GenerationConfig` and `load_hf` read it, and `AutoModelForCausalLM` too where the run's
config is one transformers has (the Flash layout: no N-gram embedding, no indexer). It is written into a
temporary sibling folder and renamed into place, so an interrupted export leaves no half-written `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from importlib import metadata

import orbax.checkpoint as ocp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.hf import expert_layout
from longcat_jax.hf.config import architecture_of, config_from_hf, config_to_hf, default_architecture
from longcat_jax.hf.weights import hf_expert_layout, load_hf, save_hf
from longcat_jax.model.longcat import LongCat, abstract_model


def save_orbax(model: LongCat, path: str, architecture: str | None = None):
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "params")):
        raise FileExistsError(f"{path}/params already exists; refusing to overwrite a checkpoint")
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), nnx.to_pure_dict(nnx.state(model)))
        ckptr.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.cfg, architecture), f, indent=2)


def load_orbax(path: str) -> tuple[Config, LongCat, str]:
    """Restore (config, model, HF architecture name) from a folder written by save_orbax."""
    path = os.path.abspath(path)
    config_file, params = os.path.join(path, "config.json"), os.path.join(path, "params")
    for needed in (config_file, params):
        if not os.path.exists(needed):
            raise FileNotFoundError(f"{needed} not found: {path} is not a complete longcat-jax "
                                    "Orbax checkpoint")
    with open(config_file) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf)
    graphdef, state = nnx.split(abstract_model(cfg))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(params, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return cfg, nnx.merge(graphdef, state), architecture_of(hf)


# What generation_config.json says it was written for when transformers (a test dependency only) is absent:
# the release the default expert layout and these files were checked against.
TRANSFORMERS_VERSION = "5.25.0"


def _transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return TRANSFORMERS_VERSION


def generation_config(bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    """generation_config.json as transformers' `GenerationConfig(...).save_pretrained` writes it: the ids
    that are set, then transformers_version."""
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return {**{k: v for k, v in ids.items() if v is not None},
            "transformers_version": _transformers_version()}


class ExportError(RuntimeError):
    """An export that cannot start; the message is one line for the command line."""


def _check_out(out: str) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ExportError(f"--out {out} exists and is not an empty folder; refusing to overwrite it "
                          "(choose another folder or remove it)")


def export_run(run: str, out: str, *, max_shard_bytes: int = 5 * 2**30, experts: str = expert_layout.DEFAULT,
               log=lambda s: print(s, file=sys.stderr)):
    """Write the newest good checkpoint of a train.py run (or the step / checkpoints folder given) as the
    Hugging Face folder `out` (see the module docstring); returns `serving.load.load_run`'s RunModel.

    Raises:
      ExportError: `out` exists and is not empty.
      serving.load.LoadError: no usable checkpoint, or a run folder that cannot be read.
    """
    from longcat_jax.serving.load import load_run
    from longcat_jax.serving.text import GENERATION_CONFIG_FILE, save_tokenizer_folder
    from longcat_jax.training.data import SPECIAL_TOKENS

    out = os.path.abspath(out)
    _check_out(out)  # before the (slow) restore
    loaded = load_run(run, log=log, flag="--run")
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    bpe = tokenizer.tokenizer

    def special(token_id):  # the spelling of a special token's id, None for an ordinary token
        return bpe.id_to_token(token_id) if token_id in tokenizer.special_ids else None

    pad_id = bpe.token_to_id(SPECIAL_TOKENS[0])  # "<pad>", the id training pads with
    pad_token = special(pad_id)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{uuid.uuid4().hex[:12]}")
    os.makedirs(tmp)
    try:
        save_hf(loaded.model, tmp, max_shard_bytes=max_shard_bytes, experts=experts)
        with open(os.path.join(tmp, GENERATION_CONFIG_FILE), "w") as f:
            json.dump(generation_config(cfg.bos_token_id, cfg.eos_token_id,
                                        pad_id if pad_token is not None else None), f, indent=2)
            f.write("\n")
        save_tokenizer_folder(bpe, tmp, bos_token=special(cfg.bos_token_id),
                              eos_token=special(cfg.eos_token_id), pad_token=pad_token,
                              chat_template=tokenizer.chat_template,
                              model_max_length=cfg.max_position_embeddings)
        _check_out(out)  # nothing appeared meanwhile
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return loaded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert LongCat checkpoints between HF and Orbax, or "
                                     "export a training run as a Hugging Face folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face folder to read")
    source.add_argument("--orbax", help="Orbax checkpoint folder to read")
    source.add_argument("--run", help="train.py run folder (or its checkpoints/ or one step folder) whose "
                        "newest good checkpoint to export as a Hugging Face folder with its tokenizer")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--to-hf", action="store_true",
                        help="write the Hugging Face layout (needs --orbax; implied by --run)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="safetensors shard size for --to-hf and --run")
    parser.add_argument("--expert-layout", choices=list(expert_layout.LAYOUTS), default=expert_layout.DEFAULT,
                        help="how --to-hf and --run store the routed experts (default: %(default)s, what "
                        "transformers >= 5.25 loads; per_expert_with_zero for transformers 5.24)")
    args = parser.parse_args(argv)
    if args.orbax and not args.to_hf or args.hf and args.to_hf:
        parser.error("use --hf DIR --out ORBAX_DIR, --orbax DIR --out HF_DIR --to-hf, "
                     "or --run DIR --out HF_DIR")
    if args.run:
        from longcat_jax.serving.load import LoadError

        try:
            loaded = export_run(args.run, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                experts=args.expert_layout)
        except (ExportError, LoadError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cfg, names = loaded.cfg, sorted(os.listdir(args.out))
        shards = sum(n.endswith(".safetensors") for n in names)
        print(f"wrote {args.out} from step {loaded.step} of {loaded.run_dir} ({default_architecture(cfg)}, "
              f"{cfg.num_layers} layers, vocabulary {cfg.vocab_size}): {shards} safetensors file(s), "
              + ", ".join(n for n in names if not n.endswith(".safetensors")))
        return 0
    if args.hf:
        with open(os.path.join(args.hf, "config.json")) as f:
            arch = architecture_of(json.load(f))
        experts = hf_expert_layout(args.hf)
        print(f"reading {args.hf}: experts stored {experts} ({expert_layout.LAYOUTS[experts]})")
        cfg, model = load_hf(args.hf)
        save_orbax(model, args.out, arch)
    else:
        cfg, model, arch = load_orbax(args.orbax)
        save_hf(model, args.out, arch, max_shard_bytes=int(args.max_shard_gb * 2**30),
                experts=args.expert_layout)
    print(f"wrote {args.out} ({arch}, {cfg.num_layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
