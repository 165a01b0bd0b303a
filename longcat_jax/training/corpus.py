"""A run's corpus: the documents (the Python standard library or --data) split into train and held-out, its
tokenizer, and the packed batches the steps read. A --data folder written by ``python -m longcat_jax.data
prepare`` is read lazily from its shards instead (``prepared_data``), with its own tokenizer."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from longcat_jax.training import data, prepared_data
from longcat_jax.training.run_log import phase


@dataclasses.dataclass
class Data:
    tokenizer: object  # tokenizers.Tokenizer
    eos: int  # its end-of-text id, which separates packed documents
    train_iter: object  # grain iterator of packed batches (its state is checkpointed)
    eval_batches: list
    sample_prompt: str = ""  # the closing sample's prompt without --prompt: the start of held-out text


def load_data(args) -> Data:
    """The corpus (stdlib, --data, or a prepared --data folder) split into train and held-out, a tokenizer,
    and packed batches."""
    t0 = time.perf_counter()
    phase(f"loading data from {args.data or 'the Python standard library'}")
    if args.data and prepared_data.is_prepared(args.data):
        return _load_prepared(args, t0)
    if args.data:
        documents = data.load_documents(args.data)
        try:
            train_texts, eval_texts = data.split_documents(documents)
        except ValueError as e:  # one paragraph, one JSON line or one file: say which input has too few
            raise ValueError(f"{args.data}: {e}") from e
    else:
        train_files, eval_files = data.split_by_file(data.stdlib_files())
        train_texts, eval_texts = data.read_text_files(train_files), data.read_text_files(eval_files)
    tokenizer = data.load_or_train_tokenizer(args.out, train_texts, args.vocab_size, args.tokenizer)
    if args.tokenizer and not args.eval_only:
        _keep_tokenizer_copy(args.tokenizer, args.out)
    eos = data.eos_id(tokenizer)
    train_docs, eval_docs = data.tokenize(tokenizer, train_texts), data.tokenize(tokenizer, eval_texts)
    train_iter = data.make_train_iterator(train_docs, args.seq_len, args.batch_size, args.seed, eos)
    eval_batches = data.make_eval_batches(eval_docs, args.seq_len, args.batch_size, eos, args.eval_batches)
    n_tokens = sum(len(d) for d in train_docs)
    phase(f"data: {len(train_docs)} train / {len(eval_docs)} held-out documents, {n_tokens:,} train tokens, "
           f"tokenizer of {tokenizer.get_vocab_size()} tokens ({time.perf_counter() - t0:.1f} s)")
    return Data(tokenizer, eos, train_iter, eval_batches, held_out_prompt(eval_texts))


def _load_prepared(args, t0: float) -> Data:
    """A prepared folder: its tokenizer is the run's, its shards are read when a batch needs a document."""
    corpus = prepared_data.open_prepared(args.data)
    prepared_data.check_run_tokenizer(corpus, args.tokenizer, args.vocab_size)
    if not args.eval_only:
        _keep_tokenizer_copy(corpus.tokenizer_path, args.out)
    train_iter = data.make_train_iterator(corpus.train, args.seq_len, args.batch_size, args.seed, corpus.eos)
    eval_batches = data.make_eval_batches(corpus.eval, args.seq_len, args.batch_size, corpus.eos,
                                          args.eval_batches)
    train = corpus.manifest["splits"]["train"]
    phase(f"data: {train['documents']} train / {len(corpus.eval.lengths)} held-out documents, "
          f"{train['tokens']:,} train tokens, tokenizer of {corpus.tokenizer.get_vocab_size()} tokens, "
          f"prepared (read as needed) ({time.perf_counter() - t0:.1f} s)")
    prompt = held_out_prompt(prepared_data.held_out_texts(corpus))
    return Data(corpus.tokenizer, corpus.eos, train_iter, eval_batches, prompt)


def _keep_tokenizer_copy(path: str, out: str):
    """OUT/tokenizer.json: a run trained with --tokenizer keeps its own copy, as serve.py and convert --run
    read it from the run folder (written atomically; left alone when it already is that file)."""
    target = os.path.join(out, "tokenizer.json")
    if os.path.exists(target) and os.path.samefile(path, target):
        return
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(path, target + ".tmp")
    os.replace(target + ".tmp", target)


def held_out_prompt(texts, limit: int = 60) -> str:
    """The closing sample's default prompt: the opening line(s) of the first held-out document that has text,
    at most `limit` characters and cut at a line boundary (each line kept with its newline), so the sample
    shows the model continuing real held-out text. A longer first line is cut at its last space before
    `limit` (at `limit` without one). "" when no document has text."""
    for text in texts:
        lines = text.splitlines(keepends=True)
        while lines and not lines[0].strip():
            lines.pop(0)  # leading blank lines
        if not lines:
            continue
        prompt = ""
        for line in lines:
            if len(prompt) + len(line) > limit:
                break
            prompt += line
        if prompt:
            return prompt
        first = lines[0][:limit]
        cut = first.rfind(" ")
        return first[:cut] if cut > 0 else first
    return ""
