"""Corpus tools: tokenize a corpus once, into shards that training reads lazily.

    python -m longcat_jax.data prepare --data my_corpus/ --out prepared/ [--vocab-size 2048 | --tokenizer T]
    python train.py --data prepared/ ...

`prepare` reads --data exactly as `train.py --data` does (a folder of text files, a .jsonl file with a `text`
field, or a text file of paragraphs; the Python standard library without --data), splits it into train and
held-out the same way, trains the same byte-level BPE unless --tokenizer is given, and writes ArrayRecord
shards of token ids, the tokenizer and a manifest (the layout is in `training/prepared_data.py`). The corpus
is streamed, never held whole. Progress goes to stderr; a bad input is one `error: ...` line and exit
status 2.
"""

from __future__ import annotations

import argparse
import sys

from longcat_jax.training import prepared_data


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text or action.default is None else super()._get_help_string(action)


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one `error:` line (argparse would print the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m longcat_jax.data", description=__doc__.split("\n\n")[0],
                       formatter_class=_HelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prep = commands.add_parser(
        "prepare", help="tokenize a corpus into ArrayRecord shards that train.py --data reads lazily",
        description="Tokenize a corpus into ArrayRecord shards that train.py --data reads lazily.",
        formatter_class=_HelpFormatter)
    prep.add_argument("--data", help="folder of text files, a .jsonl file with a `text` field, or a text "
                                     "file of paragraphs, read as train.py --data reads it (default: the "
                                     "Python standard library)")
    prep.add_argument("--out", required=True,
                      help="folder to write (train/ and eval/ shards, tokenizer.json, manifest.json)")
    vocab = prep.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", help="encode with this tokenizer.json instead of training a BPE")
    vocab.add_argument("--vocab-size", type=int, default=prepared_data.DEFAULT_VOCAB_SIZE,
                       help="vocabulary of the BPE trained on the train documents (train.py --vocab-size "
                            "must match it)")
    prep.add_argument("--shard-docs", type=int, default=prepared_data.DEFAULT_SHARD_DOCS,
                      help="documents per shard file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepared_data.prepare(args.data, args.out, args.tokenizer, args.vocab_size, args.shard_docs)
    except (ValueError, OSError) as e:  # the data layer names the file and what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
