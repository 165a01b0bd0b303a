"""longcat_jax.training.prepared_data and `python -m longcat_jax.data prepare`: the prepared folder's layout,
batches equal to the in-memory path, lazy reading, damaged folders and tokenizer mismatches refused in one
line; and the one-line errors of train.py for bad --data that test_train.py does not already cover."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types

import grain
import numpy as np
import pytest

import train
from longcat_jax import data as data_cli
from longcat_jax.training import data, prepared_data
from longcat_jax.training.corpus import held_out_prompt, load_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d ")  # run_log.phase and prepare's progress lines
VOCAB = 300


def _corpus(folder, n=40):
    """A .jsonl of n short documents with some shared words, enough for a 300-token BPE to find merges."""
    words = ["alpha", "beta", "gamma", "delta", "packing", "token", "shard", "épsilon", "</s>"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        text = f"document {i}\n" + " ".join(rng.choice(words, size=int(rng.integers(3, 30))))
        lines.append(json.dumps({"text": text}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _args(data_path, out, **kw):
    base = dict(data=str(data_path), out=str(out), vocab_size=VOCAB, tokenizer=None, seq_len=16, batch_size=2,
                seed=3, eval_batches=None, eval_only=False)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(source .jsonl, prepared folder, its manifest): 3 documents per shard, so the train split has many."""
    root = tmp_path_factory.mktemp("prepared")
    src = _corpus(root)
    out = root / "prep"
    manifest = prepared_data.prepare(src, str(out), vocab_size=VOCAB, shard_docs=3, log=lambda s: None)
    return src, out, manifest


def _copy(prepared, tmp_path):
    shutil.copytree(prepared[1], tmp_path / "prep")
    return tmp_path / "prep"


def test_prepare_writes_manifest_shards_and_the_training_tokenizer(prepared):
    src, out, manifest = prepared
    train_texts, eval_texts = data.split_documents(data.load_documents(src))
    # The BPE is the one train.py trains on the same train documents.
    tokenizer = data.load_tokenizer(str(out / "tokenizer.json"))
    assert tokenizer.to_str() == data.train_bpe(train_texts, VOCAB).to_str()
    assert json.load(open(out / "manifest.json")) == manifest
    info = manifest["tokenizer"]
    assert (manifest["format"], manifest["version"]) == (prepared_data.FORMAT, prepared_data.VERSION)
    assert info["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert (info["eos_id"], info["vocab_size"], info["trained_vocab_size"]) == (2, VOCAB, VOCAB)
    for name, texts in (("train", train_texts), ("eval", eval_texts)):
        split, expected = manifest["splits"][name], data.tokenize(tokenizer, texts)
        assert split["documents"] == len(texts) and split["tokens"] == sum(len(t) for t in expected)
        np.testing.assert_array_equal(np.load(out / split["lengths"]), [len(t) for t in expected])
        assert [s["documents"] for s in split["shards"]][:-1] == [3] * (len(split["shards"]) - 1)
        # One record per document, in order: its token ids as little-endian int32 bytes.
        records = grain.sources.ArrayRecordDataSource([str(out / s["file"]) for s in split["shards"]])
        assert len(records) == len(texts)
        for record, tokens in zip(records, expected):
            np.testing.assert_array_equal(np.frombuffer(record, "<i4"), tokens)
    assert len(manifest["splits"]["train"]["shards"]) > 5
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_batches_equal_the_in_memory_path(prepared, tmp_path):
    """The corpus loaded in memory with the prepared tokenizer gives the same batches, eval and prompt."""
    src, out, _ = prepared
    from_text = load_data(_args(src, tmp_path / "a", tokenizer=str(out / "tokenizer.json")))
    from_shards = load_data(_args(out, tmp_path / "b"))
    # Batches of 2 x 16 tokens, into the second epoch (a new permutation).
    n = prepared[2]["splits"]["train"]["tokens"] // 32 + 3
    for _ in range(n):
        a, b = next(from_text.train_iter), next(from_shards.train_iter)
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(from_text.eval_batches) == len(from_shards.eval_batches) > 1
    for a, b in zip(from_text.eval_batches, from_shards.eval_batches):
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert from_shards.sample_prompt and from_shards.sample_prompt == from_text.sample_prompt
    assert from_shards.eos == from_text.eos == 2
    # The run keeps the prepared tokenizer as its own (serve.py and convert --run read it from OUT).
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    # Resumable like the in-memory iterator: the state is the batch index.
    state = from_shards.train_iter.get_state()
    again = load_data(_args(out, tmp_path / "c")).train_iter
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs"], next(from_shards.train_iter)["inputs"])


def test_shards_are_read_only_when_a_batch_needs_them(prepared, tmp_path):
    _, out, manifest = prepared
    corpus = prepared_data.open_prepared(str(out))
    n_shards = len(manifest["splits"]["train"]["shards"])
    it = data.make_train_iterator(corpus.train, 4, 2, seed=0, eos_id=corpus.eos)
    assert corpus.train.records_read == 0 and corpus.train.shards_opened == 0
    next(it)
    # A batch of 2 x 4 tokens spans at most 9 documents; grain builds at most 3 batches ahead by now.
    assert 0 < corpus.train.records_read <= 27 < len(corpus.train.lengths)
    assert 0 < corpus.train.shards_opened < n_shards
    assert corpus.eval.records_read == 0
    # Independently of those counters: shards deleted after opening are only missed when a batch needs them.
    out = _copy(prepared, tmp_path)
    corpus = prepared_data.open_prepared(str(out))
    it = data.make_train_iterator(corpus.train, 4, 2, seed=0, eos_id=corpus.eos)
    for shard in (out / "train").glob("*.array_record"):
        os.remove(shard)
    with pytest.raises(ValueError, match="not a readable ArrayRecord shard"):
        next(it)


@pytest.mark.parametrize("damage, message", [
    ("no-manifest", "has shards but no manifest.json: its prepare step did not finish"),
    ("truncated-manifest", "manifest.json: not a readable manifest"),
    ("other-version", "format version 99, this code reads version 1"),
    ("missing-shard", r"shard .*train/shard-00001.array_record is missing"),
    ("grown-shard", r"shard .*train/shard-00000.array_record has \d+ bytes, manifest.json says"),
    ("lengths", r"lengths.npy is missing or not the one manifest.json names"),
    ("tokenizer", r"tokenizer.json is missing or not the tokenizer"),
    ("eval-shard-swapped", r"eval/shard-00000.array_record holds \d+ documents, its manifest says"),
])
def test_a_damaged_folder_is_a_clear_error(prepared, tmp_path, damage, message):
    out = _copy(prepared, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    if damage == "no-manifest":
        os.remove(out / "manifest.json")  # what an interrupted prepare leaves
    elif damage == "truncated-manifest":
        text = (out / "manifest.json").read_text()
        (out / "manifest.json").write_text(text[: len(text) // 2])
    elif damage == "other-version":
        (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    elif damage == "missing-shard":
        os.remove(out / "train" / "shard-00001.array_record")
    elif damage == "grown-shard":
        with open(out / "train" / "shard-00000.array_record", "ab") as f:
            f.write(b"\0" * 10)
    elif damage == "lengths":
        np.save(out / "train" / "lengths.npy", np.ones(3, np.int32))
    elif damage == "tokenizer":
        data.train_bpe(["something else entirely"], VOCAB).save(str(out / "tokenizer.json"))
    else:  # a shard of the same byte size but other records, found when the eval batches read it
        shutil.copy(out / "train" / "shard-00000.array_record", out / "eval" / "shard-00000.array_record")
    assert prepared_data.is_prepared(str(out))  # never mistaken for a folder of text files
    with pytest.raises(ValueError, match=message):
        load_data(_args(out, tmp_path / "run"))


def test_a_train_shard_that_disagrees_is_found_when_read(prepared, tmp_path):
    out = _copy(prepared, tmp_path)
    shutil.copy(out / "train" / "shard-00004.array_record", out / "train" / "shard-00003.array_record")
    corpus = prepared_data.open_prepared(str(out))  # same byte size: opening cannot tell
    with pytest.raises(ValueError, match=r"shard-00003.array_record: document \d+ has \d+ tokens, the manif"):
        corpus.train.get(np.arange(len(corpus.train.lengths)))


def test_the_prepared_tokenizer_is_the_runs(prepared, tmp_path):
    _, out, _ = prepared
    other = tmp_path / "other.json"
    data.train_bpe(["a different corpus", "of two documents"], VOCAB).save(str(other))
    with pytest.raises(ValueError, match=f"--tokenizer {other} is not the tokenizer {out} was prepared with"):
        load_data(_args(out, tmp_path / "run", tokenizer=str(other)))
    with pytest.raises(ValueError, match=f"--vocab-size 2048 disagrees with {out}.*--vocab-size {VOCAB}"):
        load_data(_args(out, tmp_path / "run", vocab_size=2048))
    # The same tokenizer (a run's copy, say, as --init-from passes it) is accepted.
    same = tmp_path / "same.json"
    shutil.copy(out / "tokenizer.json", same)
    assert load_data(_args(out, tmp_path / "run", tokenizer=str(same))).eos == 2


def test_prepare_with_a_tokenizer_and_its_refusals(prepared, tmp_path):
    src, out, _ = prepared
    given = prepared_data.prepare(src, str(tmp_path / "p"), tokenizer_path=str(out / "tokenizer.json"),
                                  log=lambda s: None)
    # The given file is copied byte for byte, and --vocab-size does not bind the run.
    assert given["tokenizer"]["sha256"] == prepared[2]["tokenizer"]["sha256"]
    assert given["tokenizer"]["trained_vocab_size"] is None
    assert given["splits"]["train"]["tokens"] == prepared[2]["splits"]["train"]["tokens"]
    assert load_data(_args(tmp_path / "p", tmp_path / "run", vocab_size=4096)).eos == 2
    with pytest.raises(ValueError, match="already holds a prepared corpus"):
        prepared_data.prepare(src, str(tmp_path / "p"), log=lambda s: None)
    with pytest.raises(ValueError, match="is already a prepared corpus"):
        prepared_data.prepare(str(out), str(tmp_path / "r"), log=lambda s: None)
    corpus_dir = tmp_path / "texts"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text("one")
    with pytest.raises(ValueError, match="is inside --data"):
        prepared_data.prepare(str(corpus_dir), str(corpus_dir / "prep"), log=lambda s: None)
    with pytest.raises(ValueError, match=r"a\.txt: need at least 2 documents"):
        prepared_data.prepare(str(corpus_dir / "a.txt"), str(tmp_path / "q"), log=lambda s: None)


def test_a_text_folder_with_its_own_manifest_is_still_text(tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "a web app"}')
    (tmp_path / "b.txt").write_text("text")
    assert not prepared_data.is_prepared(str(tmp_path))


def test_cli_prepare_then_train_reads_it_and_errors_are_one_line(prepared, tmp_path, capfd):
    """One `python -m longcat_jax.data prepare` and one train.py run, as subprocesses (what a user sees on
    stderr, C++ logging included); the other errors in-process, where stderr is captured at the fd level."""
    src = prepared[0]
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "longcat_jax.data", "prepare", "--data", src, "--out", str(out),
           "--vocab-size", str(VOCAB), "--shard-docs", "5"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(PROGRESS.match(line) for line in done.stderr.splitlines()) and "wrote" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["documents"] for s in manifest["splits"]["train"]["shards"]][0] == 5
    # train.py on a prepared folder whose eval shard is damaged: progress lines, then one error line.
    shutil.copy(out / "train" / "shard-00000.array_record", out / "eval" / "shard-00000.array_record")
    cmd = [sys.executable, "train.py", "--data", str(out), "--out", str(tmp_path / "run"), "--vocab-size",
           str(VOCAB), "--no-compile-cache"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _assert_one_error_line(done.returncode, done.stderr, "eval/shard-00000.array_record holds")
    # The CLI's own usage errors and bad inputs: one line, exit status 2.
    for argv, message in (
        (["prepare", "--out", str(tmp_path / "x"), "--tokenizer", "t.json", "--vocab-size", "300"],
         "not allowed with argument"),
        (["prepare", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "does not exist"),
        (["prepare", "--data", src, "--out", str(tmp_path / "x"), "--shard-docs", "0"], "must be >= 1"),
        (["prepare", "--data", src, "--out", str(tmp_path / "x"), "--vocab-size", "100"], "must be >= 259"),
    ):
        _assert_one_error_line(_cli(argv), capfd.readouterr().err, message)


def test_every_cli_flag_has_help():
    (commands,) = [a for a in data_cli.build_parser()._actions if a.dest == "command"]
    missing = [a.option_strings[0] for p in commands.choices.values() for a in p._actions if not a.help]
    assert not missing, missing


def _cli(argv) -> int:
    try:
        return data_cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


def _assert_one_error_line(rc, err, message):
    lines = err.strip().splitlines()
    errors = [line for line in lines if not PROGRESS.match(line)]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err


@pytest.mark.parametrize("files, target, message", [
    ({"one.txt": b"a single paragraph\nof two lines\n"}, "one.txt", "one.txt: need at least 2 documents"),
    ({"a.txt": b"x", "b.txt": b"y"}, ".", "tok' is a folder, not a tokenizer.json file"),
    ({"c.jsonl": b'{"text": "a"}\n{"text": "b\xe2\x80\xa8c"}\n{"text": "\xff"}\n'}, "c.jsonl",
     "c.jsonl: not valid UTF-8 (invalid start byte at byte 42, line 3)"),
])
def test_train_bad_data_is_one_line(tmp_path, capfd, files, target, message):
    """Cases test_train.py does not cover: too few documents names the input, a folder given as --tokenizer,
    and a JSONL whose bad byte is located (its line 2 holds U+2028, which is not a line break)."""
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "tok").mkdir()
    argv = ["--data", str(tmp_path / target), "--out", str(tmp_path / "run"), "--no-compile-cache",
            "--vocab-size", str(VOCAB)]
    if "folder" in message:
        argv += ["--tokenizer", str(tmp_path / "tok")]
    rc = train.main(argv)
    _assert_one_error_line(rc, capfd.readouterr().err, message)


def test_a_single_text_file_is_accepted_where_a_folder_is_expected(tmp_path):
    path = tmp_path / "book.txt"
    paragraphs = [f"paragraph {i}\nwith a second line about {i * 7}" for i in range(30)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    corpus = load_data(_args(path, tmp_path / "run"))
    _, held_out = data.split_documents(paragraphs)
    assert corpus.sample_prompt == held_out_prompt(held_out) and corpus.eval_batches
    assert next(corpus.train_iter)["inputs"].shape == (2, 16)
