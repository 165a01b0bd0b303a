"""longcat_jax.training.data: corpus split and loading, tokenizer, packing, resumable grain iterators."""

import hashlib
import os
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tokenizers import Tokenizer, models

from longcat_jax.training import data

EOS = 2
KEYS = data.BATCH_KEYS


def _docs(n=12, seed=0, lo=1, hi=40):
    """Synthetic token documents with ids in [3, 300), so EOS (2) only appears as the separator."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=rng.integers(lo, hi), dtype=np.int32) for _ in range(n)]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_batch_invariants(batch, B, L):
    """Structure that must hold in any batch, train or eval."""
    inp, tgt, seg, pos, mask = (batch[k] for k in KEYS)
    for k, dtype in zip(KEYS, (np.int32,) * 4 + (np.float32,)):
        assert batch[k].shape == (B, L) and batch[k].dtype == dtype, k
    valid = seg > 0
    # Targets are the inputs shifted by one within a row.
    np.testing.assert_array_equal(tgt[:, :-1][valid[:, 1:]], inp[:, 1:][valid[:, 1:]])
    # A new segment starts at the row start and exactly after an EOS input, nowhere else.
    assert np.all(seg[valid[:, 0], 0] == 1)
    starts = (seg[:, 1:] != seg[:, :-1]) & valid[:, 1:]
    np.testing.assert_array_equal(starts, (inp[:, :-1] == EOS) & valid[:, 1:])
    assert np.all(np.diff(seg, axis=1)[valid[:, 1:]] >= 0)
    # Positions restart at 0 on each piece and count up inside it.
    assert np.all(pos[:, 0] == 0)
    np.testing.assert_array_equal(pos[:, 1:][starts], 0)
    cont = valid[:, 1:] & ~starts
    np.testing.assert_array_equal(pos[:, 1:][cont], pos[:, :-1][cont] + 1)
    # The loss is masked on EOS inputs (their target is the next document) and on padding.
    np.testing.assert_array_equal(mask, ((inp != EOS) & valid).astype(np.float32))
    # Padding is a suffix and is all zeros.
    assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
    for k in KEYS:
        assert np.all(batch[k][~valid] == 0), k


def _stream(batches):
    """The packed token stream: rows overlap by one token, so inputs plus the final target rebuild it."""
    rows = [b for b in batches]
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in rows])
    last = rows[-1]
    r, c = np.nonzero(last["segment_ids"] > 0)
    return np.append(inputs, last["targets"][r[-1], c[-1]])


def _split_docs(stream):
    cut = np.flatnonzero(stream == EOS)
    return [tuple(d[:-1]) for d in np.split(stream[: cut[-1] + 1], cut[:-1] + 1)]


# ----------------------------------------------------------------------------------------------- split


def test_stdlib_files_are_sorted_python_sources():
    files = data.stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    assert not any({"site-packages", "test", "__pycache__"} & set(f.split(os.sep)) for f in files)


def test_split_by_file_is_deterministic_disjoint_and_stable():
    files = data.stdlib_files()
    train, ev = data.split_by_file(files)
    assert (train, ev) == data.split_by_file(list(files))
    assert not set(train) & set(ev) and sorted(train + ev) == files
    assert 0.01 < len(ev) / len(files) < 0.15
    # Membership depends only on each file's relative path, not on the input order or on the other files.
    train2, ev2 = data.split_by_file(files[::-1] + [files[0] + "_new.py"], root=os.path.dirname(files[0]))
    assert set(ev) <= set(ev2) and set(train) <= set(train2)
    # The same tree under another root splits the same way.
    moved = ["/elsewhere/lib/" + os.path.relpath(f, os.path.dirname(files[0])) for f in files]
    assert len(data.split_by_file(moved, root="/elsewhere/lib")[1]) == len(ev)


def test_split_known_answer():
    # Pinned so the split cannot silently change across processes or machines (as the salted hash() would).
    _, ev = data.split_by_file([f"/r/f{i}.py" for i in range(40)], 0.2)
    assert [os.path.basename(p) for p in ev] == [f"f{i}.py" for i in (0, 3, 5, 6, 13, 15, 16, 29, 39)]


def test_split_errors_and_never_empty_eval():
    train, ev = data.split_by_file(["/a/x.txt", "/a/y.txt"], eval_fraction=1e-9)
    assert len(train) == 1 and len(ev) == 1
    train, ev = data.split_by_file(["/a/x.txt", "/a/y.txt"], eval_fraction=1 - 1e-9)
    assert len(train) == 1 and len(ev) == 1
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_by_file(["/a/x", "/a/y"], eval_fraction=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        data.split_by_file(["/a/x"])
    tr_docs, ev_docs = data.split_documents([f"doc {i}" for i in range(200)], 0.1)
    assert len(tr_docs) + len(ev_docs) == 200 and 5 < len(ev_docs) < 40
    assert (tr_docs, ev_docs) == data.split_documents([f"doc {i}" for i in range(200)], 0.1)


# ----------------------------------------------------------------------------------------------- loading


def test_load_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha é", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".git" / "blob").write_bytes(b"\xff\xfe")
    assert data.load_documents(str(tmp_path)) == ["alpha é", "zeta"]


def test_load_single_text_file_as_paragraphs(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("first\nparagraph\n\n  \nsecond\n\n\nthird é\n", encoding="utf-8")
    assert data.load_documents(str(p)) == ["first\nparagraph", "second", "third é"]


def test_load_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n{"text": ""}\n', encoding="utf-8")
    assert data.load_documents(str(p)) == ["one", "two\nlines"]
    # Lines end at "\n" only: a raw U+2028 inside a JSON string (valid JSON) is text, not a line break.
    p.write_bytes('{"text": "a\u2028b"}\r\n{"text": "c"}\n'.encode("utf-8"))
    assert data.load_documents(str(p)) == ["a\u2028b", "c"]


def test_documents_stream_one_at_a_time(tmp_path):
    """A later file's or line's error comes only when the reader reaches it, after the earlier documents."""
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_bytes(b"\xff")
    docs = data.iter_documents(str(tmp_path))
    assert next(docs) == "first"
    with pytest.raises(ValueError, match=r"b\.txt: not valid UTF-8"):
        next(docs)
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "x"}\n{"text": "y"}\n{oops\n', encoding="utf-8")
    docs = data.iter_documents(str(p))
    assert [next(docs), next(docs)] == ["x", "y"]
    with pytest.raises(ValueError, match=r"c\.jsonl:3: invalid JSON"):
        next(docs)


def test_paragraphs_read_in_chunks_equal_one_split(tmp_path):
    """A single text file is split chunk by chunk exactly as one regex split of the whole (universal-newline)
    text, whatever the chunk size and however whitespace runs straddle chunk ends."""
    rng = np.random.default_rng(0)
    alphabet = ["a", "bc", " ", "\t", "\n", "\n", "\n\n", "\r", "\r\n", "\u2028", "\x0c", "é", "\x85"]
    p = tmp_path / "t.txt"
    for _ in range(300):
        p.write_bytes("".join(rng.choice(alphabet, size=int(rng.integers(0, 60)))).encode("utf-8"))
        with open(p, encoding="utf-8") as f:
            whole = [d.strip("\n") for d in re.split(r"\n\s*\n", f.read())]
        for chunk in (1, 3, 8):
            assert list(data._paragraphs(str(p), chunk_chars=chunk)) == whole


@pytest.mark.parametrize(
    "files, target, error, match",
    [
        ({}, "missing", FileNotFoundError, "does not exist"),
        ({}, ".", ValueError, "contains no files"),
        ({"x.bin": b"ok\xff"}, ".", ValueError, r"x\.bin: not valid UTF-8"),
        ({"link": None}, ".", ValueError, "link: cannot read"),
        ({"e.txt": b""}, ".", ValueError, "every document"),
        ({"e.txt": b"\n \n\n"}, "e.txt", ValueError, "every document"),
        ({"e.jsonl": b"\n"}, "e.jsonl", ValueError, "no JSON lines"),
        ({"e.jsonl": b'{"text": ""}\n'}, "e.jsonl", ValueError, "every document"),
        ({"e.jsonl": b'{"text": "a"}\n{"text": \n'}, "e.jsonl", ValueError, r"e\.jsonl:2: invalid JSON"),
        (
            {"e.jsonl": b'{"text": "a"}\n\n{"txt": "b"}\n'},
            "e.jsonl",
            ValueError,
            r"e\.jsonl:3: .*string \"text\"",
        ),
        ({"e.jsonl": b'{"text": 5}\n'}, "e.jsonl", ValueError, r"e\.jsonl:1: "),
        ({"e.jsonl": b'["text"]\n'}, "e.jsonl", ValueError, r"e\.jsonl:1: "),
        ({"e.jsonl": b'{"text": "\xff"}\n'}, "e.jsonl", ValueError, r"e\.jsonl: not valid UTF-8"),
    ],
    ids=[
        "missing",
        "empty-folder",
        "not-utf8",
        "unreadable",
        "all-empty",
        "plain-file",
        "empty-jsonl",
        "empty-texts",
        "bad-json",
        "no-text",
        "text-not-str",
        "not-object",
        "jsonl-not-utf8",
    ],
)
def test_load_documents_errors(tmp_path, files, target, error, match):
    for name, content in files.items():
        if content is None:  # a dangling symlink: listed in the folder, fails on open
            (tmp_path / name).symlink_to(tmp_path / "nowhere")
        else:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=match):
        data.load_documents(str(tmp_path / target))


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def texts():
    return data.read_text_files(data.stdlib_files()[:6])


@pytest.fixture(scope="module")
def tokenizer(texts):
    return data.train_bpe(texts, 300)


def test_bpe_special_ids_roundtrip_and_determinism(tokenizer, texts):
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 300 and data.eos_id(tokenizer) == 2
    ids = data.tokenize(tokenizer, texts[:2])
    assert all(a.dtype == np.int32 for a in ids)
    assert [tokenizer.decode(a.tolist()) for a in ids] == texts[:2]  # byte-level: lossless
    assert data.train_bpe(texts, 300).to_str() == tokenizer.to_str()
    # A literal separator spelling inside a document stays text, so packing's EOS ids are the only ones.
    (ids,) = data.tokenize(tokenizer, ["a</s>b<s>"])
    assert not np.isin(ids, [0, 1, 2]).any() and tokenizer.decode(ids.tolist()) == "a</s>b<s>"
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_bpe(texts, 100)


def test_tokenizer_cache_and_explicit_path(tmp_path, texts):
    out = tmp_path / "run"
    first = data.load_or_train_tokenizer(str(out), texts[:3], 300)
    cached = out / "tokenizer.json"
    mtime = cached.stat().st_mtime_ns
    # Different texts: a retrain would give a different tokenizer, the cache must win.
    second = data.load_or_train_tokenizer(str(out), texts[3:], 300)
    assert cached.stat().st_mtime_ns == mtime and second.to_str() == first.to_str()
    assert data.train_bpe(texts[3:], 300).to_str() != first.to_str()
    with pytest.raises(ValueError, match="more than vocab_size"):
        data.load_or_train_tokenizer(str(out), texts, 280)
    # An explicit --tokenizer file wins over the cache and does not write one.
    other = tmp_path / "other.json"
    data.train_bpe(texts[3:], 320).save(str(other))
    loaded = data.load_or_train_tokenizer(str(tmp_path / "run2"), texts, 300, tokenizer_path=str(other))
    assert loaded.get_vocab_size() == 320 and not (tmp_path / "run2").exists()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_or_train_tokenizer(str(out), texts, 300, tokenizer_path=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer"):
        data.load_or_train_tokenizer(str(out), texts, 300, tokenizer_path=str(tmp_path / "bad.json"))


def test_eos_id_alternatives():
    gpt2_like = Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    assert data.eos_id(gpt2_like) == 1
    with pytest.raises(ValueError, match="no end-of-text token"):
        data.eos_id(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))


# ----------------------------------------------------------------------------------------------- packing


def test_train_packing_structure_and_epochs():
    docs = _docs(n=12)
    B, L = 3, 16
    total = sum(len(d) + 1 for d in docs)
    n_batches = 3 * total // (B * L) + 1  # a little over three epochs
    batches = _take(data.make_train_iterator(docs, L, B, seed=7, eos_id=EOS), n_batches)
    for b in batches:
        _check_batch_invariants(b, B, L)
        assert b["segment_ids"].min() >= 1  # training never pads
    # Consecutive rows overlap by one token: no target is skipped, none is repeated.
    rows_in = np.concatenate([b["inputs"] for b in batches])
    rows_tg = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(rows_tg[:-1, -1], rows_in[1:, 0])
    # Each epoch is a permutation of all documents, each followed by one EOS; epochs differ in order.
    stream = _stream(batches)
    epochs = [_split_docs(stream[e * total : (e + 1) * total]) for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == sorted(tuple(d) for d in docs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_batches_are_pinned():
    """Bit for bit the batches of the packer that held the corpus as one flat array (digests taken from it
    before the document store replaced it), so earlier runs and their checkpoints resume unchanged."""

    def digest(batches):
        h = hashlib.sha256()
        for b in batches:
            for k in KEYS:
                h.update(k.encode() + np.ascontiguousarray(b[k]).tobytes())
        return h.hexdigest()[:16]

    train = data.make_train_iterator(_docs(12), 16, 3, seed=7, eos_id=EOS)
    assert digest(_take(train, 25)) == "d9f6f82c55ed22df"
    tiny = data.make_train_iterator([np.array([5, 6, 7], np.int32)], 10, 2, seed=0, eos_id=EOS)
    assert digest(_take(tiny, 4)) == "09babbdea9159e60"
    assert digest(data.make_eval_batches(_docs(7, seed=1), 8, 2, eos_id=EOS)) == "78b4a0de3388a58c"


def test_train_iterator_determinism_and_seed():
    docs = _docs(n=20)
    a = _take(data.make_train_iterator(docs, 8, 2, seed=3, eos_id=EOS), 6)
    b = _take(data.make_train_iterator(docs, 8, 2, seed=3, eos_id=EOS), 6)
    c = _take(data.make_train_iterator(docs, 8, 2, seed=4, eos_id=EOS), 6)
    _assert_same(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_long_documents_and_corpus_shorter_than_a_row():
    # One document longer than many rows, and a corpus of 4 tokens spread over several epochs per row.
    for docs in ([np.arange(3, 100, dtype=np.int32)], [np.array([5, 6, 7], np.int32)]):
        batches = _take(data.make_train_iterator(docs, 10, 2, seed=0, eos_id=EOS), 4)
        for b in batches:
            _check_batch_invariants(b, 2, 10)
    np.testing.assert_array_equal(batches[0]["inputs"][0], [5, 6, 7, 2, 5, 6, 7, 2, 5, 6])
    np.testing.assert_array_equal(batches[0]["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(batches[0]["positions"][1], [0, 1, 0, 1, 2, 3, 0, 1, 2, 3])


def test_eval_batches_one_padded_pass_in_order():
    docs = _docs(n=7, seed=1)
    B, L = 2, 8
    batches = data.make_eval_batches(docs, L, B, eos_id=EOS)
    for b in batches:
        _check_batch_invariants(b, B, L)
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    np.testing.assert_array_equal(_stream(batches), expected)
    total_targets = sum(float(b["loss_mask"].sum()) for b in batches)
    assert total_targets == sum(len(d) for d in docs)  # each token predicts its successor or its EOS, once
    assert (batches[-1]["segment_ids"] == 0).any()  # this corpus does not fill the last batch
    assert len(data.make_eval_batches(docs, L, B, eos_id=EOS, max_batches=2)) == 2
    with pytest.raises(ValueError, match="no tokens"):
        data.make_eval_batches([np.zeros(0, np.int32)], L, B, eos_id=EOS)
    with pytest.raises(ValueError, match="no documents"):
        data.make_train_iterator([], L, B, seed=0, eos_id=EOS)


def test_real_text_pipeline(tokenizer, texts):
    token_docs = data.tokenize(tokenizer, texts)
    it = data.make_train_iterator(token_docs, 32, 4, seed=0, eos_id=data.eos_id(tokenizer))
    for b in _take(it, 3):
        _check_batch_invariants(b, 4, 32)
    (first,) = data.make_eval_batches(token_docs, 32, 4, data.eos_id(tokenizer), max_batches=1)
    assert len(token_docs[0]) > 33  # eval keeps the given order: the first row is the first file's start
    np.testing.assert_array_equal(first["inputs"][0], token_docs[0][:32])


# ----------------------------------------------------------------------------------------------- resume


def test_iterator_get_state_set_state_resumes_exactly():
    docs = _docs(n=9)
    it = data.make_train_iterator(docs, 8, 2, seed=5, eos_id=EOS)
    _take(it, 11)  # past the first epoch boundary
    state = it.get_state()
    expected = _take(it, 7)
    fresh = data.make_train_iterator(docs, 8, 2, seed=5, eos_id=EOS)
    fresh.set_state(state)
    _assert_same(_take(fresh, 7), expected)


def test_orbax_checkpoint_manager_round_trip(tmp_path):
    docs = _docs(n=9)
    it = data.make_train_iterator(docs, 8, 2, seed=5, eos_id=EOS)
    _take(it, 4)
    tree = {"w": np.arange(6, dtype=np.float32)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), options=options) as mngr:
        mngr.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), data=grain.checkpoint.CheckpointSave(it)
            ),
        )
        mngr.wait_until_finished()
    expected = _take(it, 5)
    fresh = data.make_train_iterator(docs, 8, 2, seed=5, eos_id=EOS)
    assert not np.array_equal(
        next(data.make_train_iterator(docs, 8, 2, 5, EOS))["inputs"], expected[0]["inputs"]
    )
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), options=options) as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(tree), data=grain.checkpoint.CheckpointRestore(fresh)
            ),
        )
    np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
    _assert_same(_take(fresh, 5), expected)
