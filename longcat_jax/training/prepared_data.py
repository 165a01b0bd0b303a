"""Pre-tokenized corpora on disk: ``python -m longcat_jax.data prepare`` writes one, ``train.py --data DIR``
reads it lazily through grain, so a corpus larger than memory trains without being tokenized up front.

A prepared folder holds the documents that ``training.corpus.load_data`` would read from the same source,
split into train and held-out the same way and encoded with the same tokenizer, so the packed batches are
the same (docs/architecture.md#training-step, step 1)::

    DIR/tokenizer.json                  the tokenizer every document was encoded with
    DIR/train/shard-00000.array_record  ArrayRecord shards, one record per document: its token ids as
                                        little-endian int32 bytes, without the EOS (the packer appends it)
    DIR/train/lengths.npy               int32 [documents]: tokens per document, all the packer needs up front
    DIR/eval/...                        the same for the held-out documents
    DIR/manifest.json                   format version, tokenizer sha256, EOS id, vocabulary size, document
                                        and token counts, shard files and sizes; written last and atomically

Without a manifest the folder is unfinished and refused. Opening checks what is cheap (the tokenizer's hash,
the lengths, every shard's presence and byte size); a shard is opened, and its record count checked, when a
batch first needs one of its documents, and each document read is checked against its recorded length.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from longcat_jax.training import data

FORMAT = "longcat-jax-prepared"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
DEFAULT_VOCAB_SIZE = 2048  # train.py's --vocab-size default, so neither command needs the flag by default
DEFAULT_SHARD_DOCS = 50_000
TOKENIZE_DOCS, TOKENIZE_CHARS = 1024, 1 << 24  # one encode_batch_fast call: at most this much text


def _stderr(text: str):
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*", "*.array_record")))


def is_prepared(path: str) -> bool:
    """Whether ``path`` is (or was meant to be) a prepared folder rather than a folder of text: it has shards
    under train/ or eval/, or a manifest of this format. A text corpus may hold some other manifest.json."""
    if not os.path.isdir(path):
        return False
    if any(os.path.basename(os.path.dirname(f)) in SPLITS for f in _shard_files(path)):
        return True
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------- writing


def _source_documents(src: str | None) -> tuple[Callable[[], Iterator[str]], np.ndarray]:
    """A fresh stream of the source's documents per call, and which of them are held out: the documents and
    split of ``training.corpus.load_data`` (stdlib files split by path; --data documents by text hash)."""
    if src is None:
        files = data.stdlib_files()
        held_out = set(data.split_by_file(files)[1])
        flags = np.array([f in held_out for f in files])
        return (lambda: (data.read_text_files([f])[0] for f in files)), flags
    hashes = array("I", (data.document_hash(t) for t in data.iter_documents(src)))  # 4 bytes per document
    try:
        return (lambda: data.iter_documents(src)), data.eval_flags(hashes)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e


class _SplitWriter:
    """One split's shards (``shard_docs`` documents each) and lengths, written as the documents come."""

    def __init__(self, out: str, split: str, shard_docs: int):
        self.out, self.split, self.shard_docs = out, split, shard_docs
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(out), split, "*.array_record")):
            os.remove(stale)  # left by an unfinished run: no manifest ever named them
        self.lengths = array("i")
        self.shards: list[dict] = []
        self._writer = None

    def add(self, tokens: np.ndarray):
        if self._writer is None:
            name = f"{self.split}/shard-{len(self.shards):05d}.array_record"
            self.shards.append({"file": name, "documents": 0})
            # group_size 1: every record is its own chunk, so one document reads without its neighbours.
            self._writer = ArrayRecordWriter(os.path.join(self.out, name), "group_size:1")
        self._writer.write(np.asarray(tokens, dtype="<i4").tobytes())
        self.lengths.append(len(tokens))
        self.shards[-1]["documents"] += 1
        if self.shards[-1]["documents"] == self.shard_docs:
            self._close_shard()

    def _close_shard(self):
        if self._writer is not None:
            self._writer.close()
            self.shards[-1]["bytes"] = os.path.getsize(os.path.join(self.out, self.shards[-1]["file"]))
            self._writer = None

    def finish(self) -> dict:
        """Closes the last shard, writes lengths.npy; returns this split's manifest entry."""
        self._close_shard()
        lengths = os.path.join(self.out, self.split, "lengths.npy")
        np.save(lengths, np.frombuffer(self.lengths, dtype=np.int32))
        return {"documents": len(self.lengths), "tokens": int(sum(self.lengths)), "shards": self.shards,
                "lengths": f"{self.split}/lengths.npy", "lengths_sha256": _sha256(lengths)}


def prepare(src: str | None, out: str, tokenizer_path: str | None = None,
            vocab_size: int = DEFAULT_VOCAB_SIZE, shard_docs: int = DEFAULT_SHARD_DOCS,
            log: Callable[[str], None] = _stderr) -> dict:
    """Tokenizes a corpus into a prepared folder, streaming: the source is read three times (hashes for the
    split, BPE training, encoding) and never held whole; encoding goes ``TOKENIZE_DOCS`` documents at a time.

    Args:
        src: what ``train.py --data`` takes (a folder of text files, a .jsonl, a text file), or None for the
            Python standard library.
        out: the folder to write; one that already holds a manifest is refused.
        tokenizer_path: a tokenizer.json to encode with; None trains train.py's byte-level BPE of
            ``vocab_size`` on the train documents.
        shard_docs: documents per shard.

    Returns:
        The manifest, as written to ``out/manifest.json``.
    """
    if shard_docs < 1:
        raise ValueError(f"--shard-docs must be >= 1, got {shard_docs}")
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise ValueError(f"{out} already holds a prepared corpus ({MANIFEST}); choose another --out or "
                         "delete it")
    if src and os.path.isdir(src) and os.path.abspath(out).startswith(os.path.join(os.path.abspath(src), "")):
        raise ValueError(f"--out {out} is inside --data {src}: its shards would be read as corpus text")
    if src and is_prepared(src):
        raise ValueError(f"--data {src} is already a prepared corpus; train.py --data reads it as it is")
    # Flag mistakes before the first (possibly long) read of the corpus.
    tokenizer = data.load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is not None:
        data.eos_id(tokenizer)  # a tokenizer without an end-of-text token cannot separate documents
    elif vocab_size < len(data.SPECIAL_TOKENS) + 256:
        raise ValueError(f"--vocab-size must be >= {len(data.SPECIAL_TOKENS) + 256} for a byte-level BPE, "
                         f"got {vocab_size}")
    t0 = time.perf_counter()
    log(f"reading {src or 'the Python standard library'}")
    documents, held_out = _source_documents(src)
    log(f"{len(held_out):,} documents: {int((~held_out).sum()):,} train, {int(held_out.sum()):,} held out")
    if tokenizer is None:
        log(f"training a byte-level BPE of {vocab_size} tokens on the train documents")
        tokenizer = data.train_bpe((t for t, e in zip(documents(), held_out) if not e), vocab_size)
    eos = data.eos_id(tokenizer)
    writers = {split: _SplitWriter(out, split, shard_docs) for split in SPLITS}
    n = 0
    last = time.perf_counter()
    for texts, flags in _chunks(documents(), held_out):
        for tokens, e in zip(data.tokenize(tokenizer, texts), flags):
            writers["eval" if e else "train"].add(tokens)
        n += len(texts)
        if time.perf_counter() - last > 5:
            last = time.perf_counter()
            log(f"encoded {n:,} / {len(held_out):,} documents")
    if n != len(held_out):
        raise ValueError(f"{src} changed while it was being prepared ({len(held_out)} documents, then {n})")
    splits = {split: w.finish() for split, w in writers.items()}
    own = os.path.join(out, "tokenizer.json")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, own + ".tmp")  # the same bytes, so its sha256 names the user's file
    else:
        tokenizer.save(own + ".tmp")
    os.replace(own + ".tmp", own)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": os.path.abspath(src) if src else "python standard library",
        "tokenizer": {"file": "tokenizer.json", "sha256": _sha256(own), "eos_id": eos,
                      "vocab_size": tokenizer.get_vocab_size(),
                      "trained_vocab_size": None if tokenizer_path else vocab_size},
        "splits": splits,
    }
    path = os.path.join(out, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)  # last and atomic: a folder with a manifest is complete
    tokens = ", ".join(f"{s['tokens']:,} {name} tokens" for name, s in splits.items())
    log(f"wrote {path}: {tokens} ({time.perf_counter() - t0:.1f} s)")
    return manifest


def _chunks(texts: Iterator[str], flags: np.ndarray) -> Iterator[tuple[list[str], np.ndarray]]:
    """Batches of documents for one encode call each, bounded in count and characters."""
    chunk, chars, start = [], 0, 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) == TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
            yield chunk, flags[start:start + len(chunk)]
            start, chunk, chars = start + len(chunk), [], 0
    if chunk:
        yield chunk, flags[start:start + len(chunk)]


# ----------------------------------------------------------------------------------------------- reading


class ShardedDocuments:
    """A ``data.DocumentStore`` over one split's ArrayRecord shards: lengths in memory, tokens read on demand.

    Each shard becomes a ``grain.sources.ArrayRecordDataSource`` the first time a batch needs one of its
    documents. ``records_read`` and ``shards_opened`` say how much has been read so far.
    """

    def __init__(self, folder: str, split: dict, lengths: np.ndarray):
        self.lengths = lengths.astype(np.int64)
        self.paths = [os.path.join(folder, s["file"]) for s in split["shards"]]
        self._counts = [s["documents"] for s in split["shards"]]
        self._first = np.cumsum([0, *self._counts])  # each shard's first document
        self._sources: list = [None] * len(self.paths)
        self._lock = threading.Lock()  # grain's prefetch thread and the eval batches may open shards at once
        self.records_read = 0

    @property
    def shards_opened(self) -> int:
        return sum(s is not None for s in self._sources)

    def _source(self, shard: int):
        with self._lock:
            if self._sources[shard] is None:
                path = self.paths[shard]
                try:
                    source = grain.sources.ArrayRecordDataSource(path)
                except RuntimeError as e:
                    raise ValueError(f"{path}: not a readable ArrayRecord shard ({e}); prepare the corpus "
                                     "again") from e
                if len(source) != self._counts[shard]:
                    raise ValueError(f"{path} holds {len(source)} documents, its manifest says "
                                     f"{self._counts[shard]}; prepare the corpus again")
                self._sources[shard] = source
            return self._sources[shard]

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self._first, indices, side="right") - 1
        out: list = [None] * len(indices)
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            positions = [int(i) for i in indices[at] - self._first[shard]]
            for j, record in zip(at, self._source(int(shard)).__getitems__(positions)):
                tokens = np.frombuffer(record, dtype="<i4").astype(np.int32)
                want = self.lengths[indices[j]]
                if len(tokens) != want:
                    raise ValueError(f"{self.paths[shard]}: document {indices[j]} has {len(tokens)} tokens, "
                                     f"the manifest says {want}; prepare the corpus again")
                out[j] = tokens
        self.records_read += len(indices)
        return out


@dataclasses.dataclass
class PreparedCorpus:
    folder: str
    manifest: dict
    tokenizer: object  # tokenizers.Tokenizer, read from folder/tokenizer.json
    eos: int
    train: ShardedDocuments
    eval: ShardedDocuments

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.folder, self.manifest["tokenizer"]["file"])


def open_prepared(folder: str) -> PreparedCorpus:
    """Reads and checks a prepared folder's manifest, tokenizer and lengths; no shard is read.

    Raises:
        ValueError: the manifest is missing (an unfinished prepare), unreadable, of another format or version,
            or disagrees with the tokenizer, the lengths or a shard file's size.
    """
    path = os.path.join(folder, MANIFEST)
    again = "run python -m longcat_jax.data prepare again"
    if not os.path.exists(path):
        raise ValueError(f"{folder} has shards but no {MANIFEST}: its prepare step did not finish; {again}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e}); {again}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest; {again}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format version {manifest.get('version')}, this code reads version "
                         f"{VERSION}")
    try:
        return _open_checked(folder, manifest)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed manifest (bad or missing field {e}); {again}") from e


def _open_checked(folder: str, manifest: dict) -> PreparedCorpus:
    again = "run python -m longcat_jax.data prepare again"
    info = manifest["tokenizer"]
    tokenizer_path = os.path.join(folder, info["file"])
    if not os.path.isfile(tokenizer_path) or _sha256(tokenizer_path) != info["sha256"]:
        raise ValueError(f"{tokenizer_path} is missing or not the tokenizer {folder} was encoded with "
                         f"(sha256 {info['sha256'][:12]}...); {again}")
    tokenizer = data.load_tokenizer(tokenizer_path)
    eos = data.eos_id(tokenizer)
    if eos != info["eos_id"] or tokenizer.get_vocab_size() != info["vocab_size"]:
        raise ValueError(f"{tokenizer_path} does not match {folder}/{MANIFEST} (EOS id or vocabulary size)")
    stores = {}
    for name in SPLITS:
        split = manifest["splits"][name]
        lengths_path = os.path.join(folder, split["lengths"])
        if not os.path.isfile(lengths_path) or _sha256(lengths_path) != split["lengths_sha256"]:
            raise ValueError(f"{lengths_path} is missing or not the one {MANIFEST} names; {again}")
        lengths = np.load(lengths_path)
        if len(lengths) != split["documents"] or int(lengths.sum()) != split["tokens"] or not len(lengths):
            raise ValueError(f"{lengths_path} disagrees with {MANIFEST} on the {name} documents; {again}")
        if sum(s["documents"] for s in split["shards"]) != split["documents"]:
            raise ValueError(f"{folder}/{MANIFEST}: the {name} shards do not add up to its documents; "
                             f"{again}")
        for shard in split["shards"]:
            shard_path = os.path.join(folder, shard["file"])
            if not os.path.isfile(shard_path):
                raise ValueError(f"shard {shard_path} is missing; {again}")
            if os.path.getsize(shard_path) != shard["bytes"]:
                raise ValueError(f"shard {shard_path} has {os.path.getsize(shard_path)} bytes, {MANIFEST} "
                                 f"says {shard['bytes']}; {again}")
        stores[name] = ShardedDocuments(folder, split, lengths)
    return PreparedCorpus(folder, manifest, tokenizer, eos, stores["train"], stores["eval"])


def check_run_tokenizer(corpus: PreparedCorpus, tokenizer_path: str | None, vocab_size: int):
    """The prepared folder's tokenizer is the run's: a ``--tokenizer`` that is another file, or (when the
    folder trained its BPE) a ``--vocab-size`` other than the one it trained with, is a ValueError naming
    both. A folder encoded with a given tokenizer takes any --vocab-size, as train.py --tokenizer does."""
    own = corpus.tokenizer_path
    if tokenizer_path is not None:
        if _sha256(tokenizer_path) != corpus.manifest["tokenizer"]["sha256"] and (
                data.load_tokenizer(tokenizer_path).to_str() != corpus.tokenizer.to_str()):
            raise ValueError(f"--tokenizer {tokenizer_path} is not the tokenizer {corpus.folder} was "
                             f"prepared with ({own}); leave --tokenizer out, or prepare the corpus with it")
        return
    trained = corpus.manifest["tokenizer"]["trained_vocab_size"]
    if trained is not None and vocab_size != trained:
        raise ValueError(f"--vocab-size {vocab_size} disagrees with {corpus.folder}, whose tokenizer ({own}) "
                         f"was trained with --vocab-size {trained}; pass --vocab-size {trained}")


def held_out_texts(corpus: PreparedCorpus) -> Iterator[str]:
    """The held-out documents decoded one at a time, in order (the closing sample's prompt reads the
    first)."""
    for i in range(len(corpus.eval.lengths)):
        (tokens,) = corpus.eval.get(np.array([i]))
        yield corpus.tokenizer.decode(tokens.tolist())
