"""Convert between Hugging Face folders and Orbax checkpoints.

    python -m longcat_jax.convert --hf HF_DIR --out ORBAX_DIR            # HF safetensors -> Orbax
    python -m longcat_jax.convert --orbax ORBAX_DIR --out HF_DIR --to-hf  # Orbax -> HF safetensors

An Orbax checkpoint here is a folder with `config.json` (the HF config, which round-trips our Config exactly)
and `params/` (the model state written by orbax's StandardCheckpointer, which commits atomically: a crash
never leaves a half-written `params/` that restores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import orbax.checkpoint as ocp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.hf import expert_layout
from longcat_jax.hf.config import architecture_of, config_from_hf, config_to_hf
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert LongCat checkpoints between HF and Orbax.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face folder to read")
    source.add_argument("--orbax", help="Orbax checkpoint folder to read")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--to-hf", action="store_true", help="write the Hugging Face layout (needs --orbax)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size for --to-hf")
    parser.add_argument("--expert-layout", choices=list(expert_layout.LAYOUTS), default=expert_layout.DEFAULT,
                        help="how --to-hf stores the routed experts (default: %(default)s, what transformers "
                        ">= 5.25 loads; per_expert_with_zero for transformers 5.24)")
    args = parser.parse_args(argv)
    if args.to_hf != bool(args.orbax):
        parser.error("use --hf DIR --out ORBAX_DIR, or --orbax DIR --out HF_DIR --to-hf")
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
