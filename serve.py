"""Greedy generation with the prefill / decode-step cache path.

    python serve.py --preset tiny --prompt-ids 5,17,42 --max-new-tokens 16
    python serve.py --hf /path/to/hf_folder --prompt-ids 1,2,3

Prints the generated token ids. The HTTP server (OpenAI API, batching, disaggregated prefill/decode) is a
later issue; this script is the single-request core it will be built on.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

import longcat_jax as lj


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--prompt-ids must be comma-separated integers, "
                                         f"got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Greedy generation with the LongCat decode cache.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=lj.Config.PRESETS, help="random weights of a preset")
    source.add_argument("--hf", help="Hugging Face checkpoint folder")
    parser.add_argument("--prompt-ids", type=parse_ids, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel-impl", default="reference", choices=("reference", "auto", "xla", "pallas"),
                        help="LSA and N-gram implementation (see pallas_kernels/)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.hf:
        cfg, model = lj.load_hf(args.hf, kernel_impl=args.kernel_impl)
    else:
        cfg = lj.Config.preset(args.preset, kernel_impl=args.kernel_impl)
        model = lj.build_model(cfg, seed=args.seed)
    bad = [i for i in args.prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        parser.error(f"prompt ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    out = lj.generate(model, jnp.asarray([args.prompt_ids], jnp.int32), args.max_new_tokens)
    print(",".join(str(int(t)) for t in out[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
