"""train.py's fine-tuning and evaluation options: --init-from (a run, a Hugging Face or an Orbax folder),
--eval-only, --capacity-factor, and the closing sample's prompt taken from held-out text.

The runs here use the reference run's flags and 12 steps (tests/training/conftest.py), so their programs come
from the compilation cache that the reference run fills; the rest is argument parsing and loading."""

import json
import os
import types

import jax
import numpy as np
import pytest

import train
from longcat_jax import convert
from longcat_jax.training import data, loop, run_settings
from longcat_jax.training.run_log import read_metrics
from tests.training.conftest import FAST, REFERENCE, run_train


def _rows(out):
    return [r for r in read_metrics(out) if "loss" in r]


def _evals(out):
    return [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]


# --- --init-from --------------------------------------------------------------------------------------------


def test_init_from_a_run_starts_from_its_weights(reference_run, corpus, tmp_path):
    """A run started from the reference run's newest checkpoint: its first held-out loss is the reference's
    last (same weights, same eval program), its first training loss near the reference's last and far below
    a fresh initialisation's; the setting and the source's tokenizer are recorded; --prompt sets the
    sample."""
    out = tmp_path / "fine_tuned"
    assert run_train(out, corpus, *REFERENCE, "--init-from", str(reference_run), "--prompt", "def f(",
                     steps=12) == 0
    ref, tuned = _rows(reference_run), _rows(out)
    ref_summary, summary = (json.load(open(d / "summary.json")) for d in (reference_run, out))
    assert summary["held_out_loss_start"] == pytest.approx(ref_summary["held_out_loss_end"], abs=1e-5)
    assert _evals(out)[0] == pytest.approx(_evals(reference_run)[-1], abs=1e-5)
    # The first batch is the reference's first (same seed): there the fresh model's loss was far higher.
    fresh, trained = ref[0]["ce"], ref[-1]["ce"]
    assert fresh - trained > 0.5
    assert tuned[0]["ce"] < trained + 0.25 * (fresh - trained), (fresh, trained, tuned[0]["ce"])
    assert summary["init_from"] == os.path.abspath(reference_run)
    saved = json.load(open(out / run_settings.SETTINGS_FILE))
    assert saved["init_from"] == os.path.abspath(reference_run)
    assert saved["tokenizer"] == os.path.abspath(reference_run / "tokenizer.json")  # the source's vocabulary
    assert (out / "tokenizer.json").read_bytes() == (reference_run / "tokenizer.json").read_bytes()
    assert (out / "sample.txt").read_text().startswith("def f(")
    # --init-from defines the run: resuming without it (or with another source) is refused.
    args = train.parse_args(["--out", str(out), "--data", corpus, *REFERENCE, *FAST, "--steps", "12",
                             "--tokenizer", str(reference_run / "tokenizer.json"), "--resume"])
    assert "was started with --init-from" in run_settings.check_resume(args)


def test_init_from_refuses_a_model_that_does_not_match(reference_run, corpus, tmp_path, capsys):
    """Another preset: one line naming the differing fields, exit 2, before any setting is saved."""
    out = tmp_path / "run"
    assert run_train(out, corpus, "--init-from", str(reference_run), "--preset", "small", steps=12) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --init-from {reference_run}: its model differs from this run's (--preset "
                          "small, vocabulary 384 from the tokenizer): ")
    assert "hidden_size 64 (this run: 512)" in err and "num_layers 2 (this run: 4)" in err
    assert not (out / run_settings.SETTINGS_FILE).exists() and not os.listdir(out / "checkpoints")


def test_init_from_refuses_another_vocabulary(reference_run, corpus):
    """Same sizes, other tokens: a run's weights need its own tokenizer."""
    tokenizer = data.load_or_train_tokenizer(str(reference_run), [], 300)
    cfg = loop.model_config(train.parse_args(["--kernel-impl", "xla"]),
                            types.SimpleNamespace(tokenizer=tokenizer, eos=data.eos_id(tokenizer)))
    weights, where = loop.load_init_weights(str(reference_run), cfg, tokenizer, "tiny")
    assert where == f"step 12 of {reference_run}" and "embed" in weights
    other = data.train_bpe(data.read_text_files(sorted(data.stdlib_files())[:4]), 300)
    with pytest.raises(loop.SettingError, match="its tokenizer .* is not this run's"):
        loop.load_init_weights(str(reference_run), cfg, other, "tiny")


def test_init_from_hugging_face_and_orbax_folders(reference_run, tmp_path):
    """The reference run exported as a Hugging Face folder, and that as an Orbax folder: each is recognised,
    checked against the run's model and yields the run's weights; the HF folder's tokenizer is the default."""
    hf, orbax = tmp_path / "hf", tmp_path / "orbax"
    assert convert.main(["--run", str(reference_run), "--out", str(hf)]) == 0
    assert convert.main(["--hf", str(hf), "--out", str(orbax)]) == 0
    tokenizer = data.load_or_train_tokenizer(str(reference_run), [], 300)
    cfg = loop.model_config(train.parse_args([]), types.SimpleNamespace(tokenizer=tokenizer,
                                                                        eos=data.eos_id(tokenizer)))
    want, _ = loop.load_init_weights(str(reference_run), cfg, tokenizer, "tiny")
    assert [loop.init_source_kind(str(p)) for p in (reference_run, reference_run / "checkpoints",
                                                     reference_run / "checkpoints" / "12", hf, orbax)] == [
        "run", "run", "run", "hf", "orbax"]
    assert loop.init_source_tokenizer(str(hf), "hf") == str(hf / "tokenizer.json")
    assert loop.init_source_tokenizer(str(reference_run / "checkpoints"), "run") == str(
        reference_run / "tokenizer.json")
    assert loop.init_source_tokenizer(str(orbax), "orbax") is None
    for source in (hf, orbax):
        got, where = loop.load_init_weights(str(source), cfg, tokenizer, "tiny")
        assert str(source) in where
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    with pytest.raises(loop.SettingError, match=r"num_layers 2 \(this run: 4\)"):
        loop.load_init_weights(str(orbax), cfg.replace(num_layers=4), tokenizer, "tiny")


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing", "no such file or folder"),
    (lambda tmp: tmp, "not a Hugging Face folder (config.json + *.safetensors), an Orbax checkpoint"),
    (lambda tmp: (tmp / "config.json").write_text("{}") and tmp, "has config.json but neither params/"),
])
def test_init_from_bad_paths(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--init-from", str(make(tmp_path))])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: --init-from" in err and message in err


# --- --eval-only --------------------------------------------------------------------------------------------


def test_eval_only_measures_the_newest_checkpoint_and_saves_nothing(reference_run, corpus, tmp_path, capsys):
    """`--eval-only --out RUN` alone: the run's settings, its newest checkpoint, the held-out loss it logged
    last, one line on stdout and OUT/eval.json; no checkpoint, metric or setting is written. --init-from
    evaluates other weights into another folder the same way."""
    def snapshot():
        ckpts = reference_run / "checkpoints"
        return ({p: os.stat(ckpts / p).st_mtime_ns for p in os.listdir(ckpts)},
                (reference_run / "metrics.jsonl").read_bytes(),
                (reference_run / run_settings.SETTINGS_FILE).read_bytes())

    before = snapshot()
    assert train.main(["--out", str(reference_run), "--eval-only"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("held-out loss ")
    logged = _evals(reference_run)[-1]
    assert float(printed[0].split()[2]) == pytest.approx(logged, abs=1e-4)
    result = json.load(open(reference_run / "eval.json"))
    assert result["held_out_loss"] == pytest.approx(logged, abs=1e-5)
    assert result["eval_batches"] == 2 and result["weights"] == f"step 12 of {reference_run}"
    assert snapshot() == before

    out = tmp_path / "eval"
    source = str(reference_run / "checkpoints")
    assert run_train(out, corpus, *REFERENCE, "--eval-only", "--init-from", source, steps=12) == 0
    assert json.load(open(out / "eval.json"))["held_out_loss"] == pytest.approx(logged, abs=1e-5)
    assert sorted(os.listdir(out)) == ["eval.json"]


def test_eval_only_takes_the_runs_settings_unless_given(reference_run):
    args = train.parse_args(["--out", str(reference_run), "--eval-only", "--eval-batches", "1"])
    assert (args.seq_len, args.batch_size, args.kernel_impl, args.eval_batches) == (32, 4, "xla", 1)
    assert args.vocab_size == 300 and args.data == json.load(open(reference_run / "run_config.json"))["data"]


def test_eval_only_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path), "--eval-only"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the usage lines
    assert f"error: --eval-only: no checkpoint in {tmp_path}" in err
    assert "--init-from PATH" in err


# --- --capacity-factor --------------------------------------------------------------------------------------


def test_capacity_factor_reaches_the_config_and_defines_the_run(tmp_path, capsys):
    tokenizer = types.SimpleNamespace(get_vocab_size=lambda: 300)
    corpus = types.SimpleNamespace(tokenizer=tokenizer, eos=2)
    assert loop.model_config(train.parse_args([]), corpus).capacity_factor is None  # dropless
    cfg = loop.model_config(train.parse_args(["--capacity-factor", "1.25", "--preset", "small"]), corpus)
    assert (cfg.capacity_factor, cfg.vocab_size, cfg.num_layers) == (1.25, 384, 4)
    # A defining setting: resuming with another capacity is refused unless allowed.
    run_settings.save(train.parse_args(["--out", str(tmp_path), "--capacity-factor", "1.25"]))
    args = train.parse_args(["--out", str(tmp_path), "--resume"])
    assert "started with --capacity-factor 1.25, not (default)" in run_settings.check_resume(args)
    args = train.parse_args(["--out", str(tmp_path), "--resume", "--allow-change", "capacity-factor"])
    assert run_settings.check_resume(args) is None
    with pytest.raises(SystemExit):
        train.parse_args(["--capacity-factor", "0"])
    assert "--capacity-factor must be > 0" in capsys.readouterr().err


# --- The closing sample's prompt ----------------------------------------------------------------------------


def test_default_prompt_is_the_start_of_held_out_text(reference_run, corpus):
    assert loop.held_out_prompt(["", "\n  \nimport os\nimport sys\n\n\ndef main():\n    pass\n"]) == \
        "import os\nimport sys\n\n\ndef main():\n    pass\n"
    lines = [f"line number {i}\n" for i in range(10)]  # 14 characters each
    assert loop.held_out_prompt(["".join(lines)]) == "".join(lines[:4])  # whole lines, at most 60 characters
    assert loop.held_out_prompt(["word " * 30]) == ("word " * 12).rstrip()  # one long line: cut at a space
    assert loop.held_out_prompt(["x" * 80]) == "x" * 60 and loop.held_out_prompt(["  ", ""]) == ""
    assert train.parse_args([]).prompt is None  # --prompt still overrides
    # The reference run (no --prompt) continued its first held-out document.
    _, held_out = data.split_documents(data.load_documents(corpus))
    prompt = loop.held_out_prompt(held_out)
    assert prompt and prompt in held_out[0][:200]
    assert (reference_run / "sample.txt").read_text().startswith(prompt)
