"""Training data: corpus files, a byte-level BPE tokenizer, and packed grain batches.

The pipeline is: text documents -> token ids (one int32 array per document) -> one stream in which every
document is followed by an EOS token -> rows of ``seq_len + 1`` tokens -> batches of
``inputs/targets/segment_ids/positions/loss_mask``, each ``[B, seq_len]``.

Packing is concatenate-and-chunk (no truncation, no padding in training): row ``r`` is the stream slice
``[r * seq_len, r * seq_len + seq_len + 1)``, so consecutive rows overlap by one token and every token of the
stream but the first is a target exactly once. Training streams are infinite: epoch ``e`` visits the documents
in a permutation drawn from ``(seed, e)``, and a row may run from one epoch into the next (epochs end on an
EOS). A batch is a pure function of its index, so the grain iterator's state is just the next batch index and
a restored iterator continues exactly where the saved one stopped. The packer holds only the documents'
lengths and reads the few a batch covers from a ``DocumentStore`` (in memory, or a prepared folder's shards).

Within a row, a "document piece" is a maximal run of one document's tokens. ``segment_ids`` number the pieces
1, 2, ... (0 = padding), ``positions`` restart at 0 on each piece, and ``loss_mask`` is 0 where the input is a
document's EOS (its target is the first token of the next document) and on padding. The EOS belongs to the
document it ends, as the N-gram reset (docs/architecture.md#ngram) expects, so the model can keep attention,
the N-gram history and the MTP targets inside one document using ``segment_ids``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

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
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    if not found:
        raise FileNotFoundError(f"no Python standard library sources found under {root!r}")
    return sorted(found)


def document_hash(text: str) -> int:
    """The key of a document's train/eval side: crc32 is stable across processes and machines, unlike the
    salted built-in hash()."""
    return zlib.crc32(text.encode("utf-8"))


def eval_flags(hashes: Sequence[int], eval_fraction: float = 0.05, what: str = "documents") -> np.ndarray:
    """Which items are held out (bool ``[N]``), from their crc32 hashes, so a split can be streamed (one hash
    per item). Fewer than 2 items, or ``eval_fraction`` outside (0, 1), is a ValueError."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(hashes) < 2:
        raise ValueError(f"need at least 2 {what} to split into train and eval, got {len(hashes)}")
    hashes = np.asarray(hashes, dtype=np.uint32)
    is_eval = hashes < eval_fraction * 2**32
    # Tiny corpora: move the extreme hash (its first holder) across so that neither side is empty.
    if not is_eval.any():
        is_eval[np.argmin(hashes)] = True
    if is_eval.all():
        is_eval[np.argmax(hashes)] = False
    return is_eval


def _split_by_hash(items: Sequence[str], keys: Sequence[str], eval_fraction: float, what: str):
    is_eval = eval_flags([document_hash(k) for k in keys], eval_fraction, what)
    return [x for x, e in zip(items, is_eval) if not e], [x for x, e in zip(items, is_eval) if e]


def split_by_file(paths: Sequence[str], eval_fraction: float = 0.05, root: str | None = None
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
    return [_read_text_file(p) for p in paths]


def _read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read file: {e.strerror or e}") from e


def _utf8_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a file read in binary and cut at b"\\n" only, so a file of any size streams
    (JSON strings may hold U+2028 and friends, which str.splitlines cuts at); decoding is strict."""
    try:
        with open(path, "rb") as f:
            offset = 0
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")  # b"\n" never falls inside a multi-byte character
                except UnicodeDecodeError as e:
                    at = f"byte {offset + e.start}, line {n}"
                    raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at {at})") from e
                offset += len(raw)
                yield n, line
    except OSError as e:
        raise ValueError(f"{path}: cannot read file: {e.strerror or e}") from e


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _paragraphs(path: str, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """A text file's paragraphs, the pieces of ``re.split(_PARAGRAPH_BREAK, text)`` with newlines stripped at
    both ends, read in chunks: each chunk is split only up to its last non-whitespace character (trailing
    whitespace may be a break the next chunk completes), and its last piece waits for more text. Chunks grow
    with that piece, so a long paragraph is rescanned a bounded number of times."""
    carry, lines, size = "", [], 0
    for _, line in _utf8_lines(path):
        lines.append(line.replace("\r\n", "\n").replace("\r", "\n"))  # universal newlines, as open() reads
        size += len(line)
        if size < max(chunk_chars, len(carry)):
            continue
        carry, lines, size = "".join([carry, *lines]), [], 0
        cut = len(carry.rstrip())
        *done, rest = _PARAGRAPH_BREAK.split(carry[:cut])
        yield from (d.strip("\n") for d in done)
        carry = rest + carry[cut:]
    yield from (d.strip("\n") for d in _PARAGRAPH_BREAK.split("".join([carry, *lines])))


def _jsonl_texts(path: str) -> Iterator[str | None]:
    """The ``text`` of each record, line by line; None for a blank line (such as a trailing newline)."""
    for n, line in _utf8_lines(path):
        if not line.strip():
            yield None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            # ValueError, not TypeError: this is bad input data, like the invalid JSON above.
            raise ValueError(f'{path}:{n}: expected an object with a string "text" field')  # noqa: TRY004
        yield record["text"]


def _folder_files(path: str) -> list[str]:
    def unreadable(e: OSError):
        raise ValueError(f"{e.filename}: cannot read folder: {e.strerror or e}")

    files = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    if not files:
        raise ValueError(f"data folder {path!r} contains no files")
    return sorted(files)


def iter_documents(path: str) -> Iterator[str]:
    """Reads a corpus one document at a time, so a corpus larger than memory streams: a folder of text files
    (file by file), a ``.jsonl`` file with a string ``text`` field per line (line by line), or a single text
    file, whose paragraphs (split at blank lines) are its documents (chunk by chunk). Yields the non-empty
    documents in file (and line) order: empty ones would feed bare EOS tokens. Blank JSONL lines are ignored.

    Folders are walked recursively in sorted order; names starting with "." (such as ``.git``) are left out.
    Every other file must be strict UTF-8: one that is not, or cannot be read, is an error naming it (nothing
    is skipped or decoded lossily).

    Raises (when the reader reaches the problem):
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no files or no lines, a file or folder is unreadable or not UTF-8, a JSONL
            line is invalid JSON or lacks a string ``text`` (the message gives ``path:line``), or every
            document is empty.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    is_jsonl = not os.path.isdir(path) and path.endswith(".jsonl")
    if os.path.isdir(path):
        texts = (_read_text_file(p) for p in _folder_files(path))
    elif is_jsonl:
        texts = _jsonl_texts(path)
    else:
        # One file holds one corpus: its paragraphs are the documents, so it can be split into train and eval.
        texts = _paragraphs(path)
    records = kept = 0
    for text in texts:
        records += text is not None
        if text:
            kept += 1
            yield text
    if is_jsonl and not records:
        raise ValueError(f"data file {path!r} contains no JSON lines")
    if not kept:
        raise ValueError(f"every document in {path!r} is empty")


def load_documents(path: str) -> list[str]:
    """The documents of ``iter_documents(path)`` as one list (a corpus that fits in memory)."""
    return list(iter_documents(path))


# ----------------------------------------------------------------------------------------------- tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE (GPT-2 pre-tokenization) with ``<pad>``=0, ``<s>``=1, ``</s>``=2.

    Byte-level means any text round-trips, so no unknown token is needed. Training is deterministic and
    streams: ``texts`` may be a generator (the trainer keeps word counts, not the texts).

    Args:
        texts: training documents.
        vocab_size: final vocabulary size, at least 259 (3 specials + 256 byte symbols); a small corpus may
            stop short of it.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} for a byte-level BPE, "
                         f"got {vocab_size}")
    texts = iter(texts)  # may be a generator: read once, by the trainer
    first = next((t for t in texts if t), None)  # empty texts add nothing to the counts
    if first is None:
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
    tokenizer.train_from_iterator(itertools.chain([first], texts), trainer)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """Reads a tokenizer.json; a missing or unparseable file is an error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path!r} is a folder, not a tokenizer.json file")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for unparseable files
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e


def load_or_train_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int,
                            tokenizer_path: str | None = None) -> Tokenizer:
    """Loads ``tokenizer_path`` if given; else reuses ``out_dir/tokenizer.json``, training and saving it
    if absent.

    Raises:
        FileNotFoundError / ValueError: ``tokenizer_path`` is missing or not a tokenizer; or the cached
            tokenizer's vocabulary is larger than ``vocab_size`` (it would not fit the model).
    """
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    cached = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(cached):
        tokenizer = load_tokenizer(cached)
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"{cached} has {tokenizer.get_vocab_size()} tokens, more than "
                             f"vocab_size={vocab_size}; use another output folder or delete it")
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


@runtime_checkable
class DocumentStore(Protocol):
    """Token documents by index, the packer's input: every length up front (small), tokens on demand.
    ``InMemoryDocuments`` holds a tokenized corpus; ``prepared_data.ShardedDocuments`` reads the ArrayRecord
    shards of ``python -m longcat_jax.data prepare`` only when a batch needs a document."""

    lengths: np.ndarray  # int64 [N]: tokens per document, without the EOS the packer appends

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        """The int32 token arrays of documents ``indices``, in that order."""
        ...


class InMemoryDocuments:
    """A ``DocumentStore`` over token arrays already in memory."""

    def __init__(self, token_docs: Sequence[np.ndarray]):
        self.docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in token_docs]
        self.lengths = np.array([len(d) for d in self.docs], dtype=np.int64)

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        return [self.docs[i] for i in indices]


class _PackedBatches:
    """Random-access batches of a packed token stream: ``batches[i]`` is a pure function of ``i``.

    ``seed=None`` gives one pass in the given document order, padded at the end (eval); an int gives an
    infinite stream with a fresh permutation per epoch (training). Only the lengths are held: a batch fetches
    the few documents it covers from ``store``, so the corpus need not fit in memory.
    """

    def __init__(self, docs, seq_len, batch_size, eos_id, seed, num_batches):
        self.store = docs if isinstance(docs, DocumentStore) else InMemoryDocuments(docs)
        if not len(self.store.lengths):
            raise ValueError("no documents to pack")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.lens = np.asarray(self.store.lengths, dtype=np.int64) + 1  # + the EOS separator
        self.total = int(self.lens.sum())
        self.eos_id = np.int32(eos_id)
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
            k = np.searchsorted(ends, off, side="right")  # visit number of each position's document
            doc = order[k]
            w = off - (ends[k] - self.lens[doc])
            # The visits this epoch's positions touch, each document's tokens followed by its EOS.
            visits = np.unique(k)
            pieces = [np.append(d, self.eos_id) for d in self.store.get(order[visits])]
            local = np.concatenate(pieces)
            local_starts = np.concatenate([[0], np.cumsum([len(piece) for piece in pieces])[:-1]])
            at = local_starts[np.searchsorted(visits, k)] + w
            tokens[sel], within[sel], length[sel] = local[at], w, self.lens[doc]
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
    token_docs: Sequence[np.ndarray] | DocumentStore, seq_len: int, batch_size: int, seed: int, eos_id: int
) -> grain.DatasetIterator:
    """An infinite, checkpointable grain iterator of packed training batches.

    Args:
        token_docs: one int32 array ``[len_i]`` per document, without EOS (it is appended here), or a
            ``DocumentStore`` that reads them when a batch needs them.
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
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    return iter(grain.MapDataset.source(source).to_iter_dataset(read))


def make_eval_batches(token_docs: Sequence[np.ndarray] | DocumentStore, seq_len: int, batch_size: int,
                      eos_id: int, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
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
