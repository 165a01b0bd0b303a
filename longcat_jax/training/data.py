"""Training data: corpus files, a byte-level BPE tokenizer, and packed grain batches.

The pipeline is: text documents -> token ids (one int32 array per document) -> one stream in which every
document is followed by an EOS token -> rows of ``seq_len + 1`` tokens -> batches of
``inputs/targets/segment_ids/positions/loss_mask``, each ``[B, seq_len]``.

Packing is concatenate-and-chunk (no truncation, no padding in training): row ``r`` is the stream slice
``[r * seq_len, r * seq_len + seq_len + 1)``, so consecutive rows overlap by one token and every token of the
stream but the first is a target exactly once. Training streams are infinite: epoch ``e`` visits the documents
in a permutation drawn from ``(seed, e)``, and a row may run from one epoch into the next (epochs end on an
EOS). A batch is a pure function of its index, so the grain iterator's state is just the next batch index and
a restored iterator continues exactly where the saved one stopped.

Within a row, a "document piece" is a maximal run of one document's tokens. ``segment_ids`` number the pieces
1, 2, ... (0 = padding), ``positions`` restart at 0 on each piece, and ``loss_mask`` is 0 where the input is a
document's EOS (its target is the first token of the next document) and on padding. The EOS belongs to the
document it ends, as the N-gram reset (docs/architecture.md#ngram) expects, so the model can keep attention,
the N-gram history and the MTP targets inside one document using ``segment_ids``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import sysconfig
import zlib
from collections.abc import Sequence

import grain
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 = Config pad / bos_token_id / eos_token_id
PAD_ID = 0
# End-of-text spellings of common tokenizers, tried in order by eos_id().
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "</longcat_s>", "<|eos|>", "[EOS]")
# Directories left out of the default corpus: installed packages, the test suites (some of whose files are
# deliberately not UTF-8) and bytecode caches.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# ----------------------------------------------------------------------------------------------- corpus files


def stdlib_files() -> list[str]:
    """The Python standard library's own ``*.py`` files, the default corpus (real code, no download).

    Returns:
        Sorted absolute paths under ``sysconfig.get_paths()["stdlib"]``, leaving out ``STDLIB_SKIP_DIRS`` and
        the machine-generated ``_sysconfigdata_*.py``.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    if not found:
        raise FileNotFoundError(f"no Python standard library sources found under {root!r}")
    return sorted(found)


def _split_by_hash(items: Sequence[str], keys: Sequence[str], eval_fraction: float, what: str):
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(items) < 2:
        raise ValueError(f"need at least 2 {what} to split into train and eval, got {len(items)}")
    # crc32 is stable across processes and machines, unlike the salted built-in hash().
    hashes = [zlib.crc32(k.encode("utf-8")) for k in keys]
    is_eval = [h < eval_fraction * 2**32 for h in hashes]
    # Tiny corpora: move the extreme hash across so that neither side is empty.
    if not any(is_eval):
        is_eval[hashes.index(min(hashes))] = True
    if all(is_eval):
        is_eval[hashes.index(max(hashes))] = False
    return [x for x, e in zip(items, is_eval) if not e], [x for x, e in zip(items, is_eval) if e]


def split_by_file(
    paths: Sequence[str], eval_fraction: float = 0.05, root: str | None = None
) -> tuple[list[str], list[str]]:
    """Deterministic train/eval split by a crc32 hash of each path relative to ``root``.

    A file's side depends only on its relative path, so it stays put when other files come or go and on any
    machine (except that neither side is ever left empty).

    Args:
        paths: at least 2 file paths.
        eval_fraction: expected fraction of files held out, in (0, 1).
        root: the corpus root; defaults to the common directory of ``paths``.

    Returns:
        (train_paths, eval_paths), each in the input order.
    """
    if root is None and paths:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    keys = [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/") for p in paths]
    return _split_by_hash(paths, keys, eval_fraction, "files")


def split_documents(texts: Sequence[str], eval_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic train/eval split of documents by a crc32 hash of their text (for ``--data`` corpora).

    Returns:
        (train_texts, eval_texts), each in the input order and never empty.
    """
    return _split_by_hash(texts, texts, eval_fraction, "documents")


def read_text_files(paths: Sequence[str]) -> list[str]:
    """Reads each file as strict UTF-8; a file that cannot be read or decoded is a ValueError naming it."""
    texts = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise ValueError(f"{p}: cannot read file: {e.strerror or e}") from e
    return texts


def _read_jsonl(path: str) -> list[str]:
    (text,) = read_text_files([path])
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines, e.g. a trailing newline, are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            # ValueError, not TypeError: this is bad input data, like the invalid JSON above.
            raise ValueError(f'{path}:{n}: expected an object with a string "text" field')  # noqa: TRY004
        docs.append(record["text"])
    return docs


def load_documents(path: str) -> list[str]:
    """Loads a corpus: a folder of text files, a ``.jsonl`` file with a string ``text`` field per line, or a
    single text file, whose paragraphs (split at blank lines) are its documents.

    Folders are walked recursively in sorted order; names starting with "." (such as ``.git``) are left out.
    Every other file must be strict UTF-8: one that is not, or cannot be read, is an error naming it (nothing
    is skipped or decoded lossily). Blank JSONL lines are ignored. Empty documents carry no text and are
    dropped, in order to not feed bare EOS tokens.

    Args:
        path: a directory or a ``.jsonl`` file.

    Returns:
        The non-empty documents, in file (and line) order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no files or no lines, a file is unreadable or not UTF-8, a JSONL line is
            invalid JSON or lacks a string ``text`` (message gives ``path:line``), or every document is empty.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        if not files:
            raise ValueError(f"data folder {path!r} contains no files")
        docs = read_text_files(sorted(files))
    elif path.endswith(".jsonl"):
        docs = _read_jsonl(path)
        if not docs:
            raise ValueError(f"data file {path!r} contains no JSON lines")
    else:
        # One file holds one corpus: its paragraphs are the documents, so it can be split into train and eval.
        docs = [d.strip("\n") for d in re.split(r"\n\s*\n", read_text_files([path])[0])]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"every document in {path!r} is empty")
    return docs


# ----------------------------------------------------------------------------------------------- tokenizer


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE (GPT-2 pre-tokenization) with ``<pad>``=0, ``<s>``=1, ``</s>``=2.

    Byte-level means any text round-trips, so no unknown token is needed. Training is deterministic.

    Args:
        texts: training documents.
        vocab_size: final vocabulary size, at least 259 (3 specials + 256 byte symbols); a small corpus may
            stop short of it.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} for a byte-level BPE, got {vocab_size}"
        )
    if not any(texts):
        raise ValueError("cannot train a tokenizer on no text")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for unparseable files
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e


def load_or_train_tokenizer(
    out_dir: str, texts: Sequence[str], vocab_size: int, tokenizer_path: str | None = None
) -> Tokenizer:
    """Loads ``tokenizer_path`` if given; else reuses ``out_dir/tokenizer.json``, training and saving it
    if absent.

    Raises:
        FileNotFoundError / ValueError: ``tokenizer_path`` is missing or not a tokenizer; or the cached
            tokenizer's vocabulary is larger than ``vocab_size`` (it would not fit the model).
    """
    if tokenizer_path is not None:
        return _load_tokenizer(tokenizer_path)
    cached = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(cached):
        tokenizer = _load_tokenizer(cached)
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(
                f"{cached} has {tokenizer.get_vocab_size()} tokens, more than vocab_size={vocab_size}; "
                "use another output folder or delete it"
            )
        return tokenizer
    tokenizer = train_bpe(texts, vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(cached + ".tmp")
    os.replace(cached + ".tmp", cached)  # atomic, so an interrupted run never leaves half a file
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's end-of-text token, the first of ``EOS_CANDIDATES`` it knows."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer has no end-of-text token; looked for {', '.join(EOS_CANDIDATES)}")


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes documents without special tokens; special-token spellings inside the text count as plain text.

    Returns:
        One int32 array ``[len_i]`` per document, so the only EOS ids in a packed stream are the separators.
    """
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # a literal "</s>" in source code must not become a separator
    try:
        encodings = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


# ----------------------------------------------------------------------------------------------- packing


class _PackedBatches:
    """Random-access batches of a packed token stream: ``batches[i]`` is a pure function of ``i``.

    ``seed=None`` gives one pass in the given document order, padded at the end (eval); an int gives an
    infinite stream with a fresh permutation per epoch (training).
    """

    def __init__(self, token_docs, seq_len, batch_size, eos_id, seed, num_batches):
        if not token_docs:
            raise ValueError("no documents to pack")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in token_docs]
        self.lens = np.array([len(d) + 1 for d in docs], dtype=np.int64)  # + the EOS separator
        self.starts = np.concatenate([[0], np.cumsum(self.lens)[:-1]])
        self.flat = np.concatenate([np.append(d, np.int32(eos_id)) for d in docs])
        self.total = int(self.flat.size)
        self.seq_len, self.batch_size, self.seed, self.num_batches = seq_len, batch_size, seed, num_batches
        self._epoch = functools.lru_cache(maxsize=4)(self._epoch_arrays)

    def __len__(self) -> int:
        return self.num_batches

    def _epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.lens)
        if self.seed is None:
            order = np.arange(n)
        else:
            order = np.random.default_rng((self.seed, epoch)).permutation(n)
        return order, np.cumsum(self.lens[order])  # document visit order, and where each one ends

    def _stream(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token, index within its document (EOS included), and document length at stream positions ``g``."""
        tokens, within, length = (np.zeros(g.shape, np.int64) for _ in range(3))
        epochs = g // self.total
        for e in np.unique(epochs):
            sel = epochs == e
            order, ends = self._epoch(int(e))
            off = g[sel] % self.total
            k = np.searchsorted(ends, off, side="right")
            doc = order[k]
            w = off - (ends[k] - self.lens[doc])
            tokens[sel], within[sel], length[sel] = self.flat[self.starts[doc] + w], w, self.lens[doc]
        return tokens, within, length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range [0, {self.num_batches})")
        B, L = self.batch_size, self.seq_len
        # Row r covers stream[r*L : r*L + L + 1]; build the B*L + 1 positions of this batch at once.
        g = np.arange(index * B * L, (index + 1) * B * L + 1, dtype=np.int64)
        valid = np.ones(g.shape, bool) if self.seed is not None else g < self.total
        tokens, within, length = self._stream(np.where(valid, g, 0))
        tokens, within = np.where(valid, tokens, PAD_ID), np.where(valid, within, 0)
        in_tokens, in_within, in_length = (a[:-1].reshape(B, L) for a in (tokens, within, length))
        # An input counts only if its target exists (eval's final EOS has none).
        in_valid = valid[1:].reshape(B, L)
        new_piece = (in_within == 0) & in_valid
        new_piece[:, 0] = in_valid[:, 0]  # a row starts a new piece even mid-document
        col = np.broadcast_to(np.arange(L), (B, L))
        piece_start = np.maximum.accumulate(np.where(new_piece, col, 0), axis=1)
        is_eos = in_within == in_length - 1
        return {
            "inputs": np.where(in_valid, in_tokens, PAD_ID).astype(np.int32),
            "targets": tokens[1:].reshape(B, L).astype(np.int32),
            "segment_ids": np.where(in_valid, np.cumsum(new_piece, axis=1), 0).astype(np.int32),
            "positions": np.where(in_valid, col - piece_start, 0).astype(np.int32),
            "loss_mask": (in_valid & ~is_eos).astype(np.float32),
        }


def make_train_iterator(
    token_docs: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int, eos_id: int
) -> grain.DatasetIterator:
    """An infinite, checkpointable grain iterator of packed training batches.

    Args:
        token_docs: one int32 array ``[len_i]`` per document, without EOS (it is appended here).
        seq_len: tokens per row, L.
        batch_size: rows per batch, B.
        seed: seeds the per-epoch document permutations; the same seed gives the same batches.
        eos_id: the separator token.

    Returns:
        A grain ``DatasetIterator`` yielding dicts of ``[B, L]`` arrays: ``inputs``, ``targets``,
        ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32). ``get_state()`` /
        ``set_state()`` and ``grain.checkpoint.CheckpointSave/Restore`` resume it exactly.
    """
    source = _PackedBatches(token_docs, seq_len, batch_size, eos_id, seed=seed, num_batches=sys.maxsize)
    # One prefetch thread overlaps batch building with the train step; grain's state still counts only the
    # batches handed out, so checkpoints stay exact.
    dataset = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    )
    return iter(dataset)


def make_eval_batches(
    token_docs: Sequence[np.ndarray],
    seq_len: int,
    batch_size: int,
    eos_id: int,
    max_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """One pass over the documents in the given order, packed like training, the tail padded.

    Padding (inputs/targets ``PAD_ID``, segment 0, loss_mask 0) fills the last row and the last batch, so
    every batch is ``[B, L]`` and one compiled eval step serves them all.

    Returns:
        At most ``max_batches`` (all if None) batch dicts, as from ``make_train_iterator``.
    """
    source = _PackedBatches(token_docs, seq_len, batch_size, eos_id, seed=None, num_batches=0)
    if source.total < 2:
        raise ValueError("eval documents hold no tokens to predict")
    rows = -(-(source.total - 1) // seq_len)  # every stream token but the first is a target once
    n = -(-rows // batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    source.num_batches = n
    return [source[i] for i in range(n)]
