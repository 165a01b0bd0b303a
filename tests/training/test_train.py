"""train.py end to end: outputs, determinism, exact resume after SIGKILL, fault guards, flag errors; then
fine-tuning and evaluation (--init-from a run, a Hugging Face or an Orbax folder, --eval-only,
--capacity-factor, the closing sample's prompt from held-out text). One file, so one worker trains the
reference run that all of them reuse."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import train
from longcat_jax import convert
from longcat_jax.training import data, run_settings
from longcat_jax.training.corpus import held_out_prompt
from longcat_jax.training.init_weights import (
    SettingError,
    init_source_kind,
    init_source_tokenizer,
    load_init_weights,
    model_config,
)
from longcat_jax.training.loop import DETERMINISTIC_XLA_FLAGS
from longcat_jax.training.run_log import read_metrics
from tests.training.conftest import FAST, REFERENCE
from tests.training.conftest import run_train as _run

# The fixtures `corpus` and `reference_run` (the deterministic 12-step run with REFERENCE flags) are in
# tests/training/conftest.py.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(out):
    return [(r["step"], r["loss"], r["ce"]) for r in read_metrics(out) if "loss" in r]


def _checkpoint_arrays(out, step=None):
    """(step, every array of that checkpoint's state by path);
    the newest checkpoint unless `step` is given."""
    import orbax.checkpoint as ocp

    if step is None:
        step = max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())
    tree = ocp.StandardCheckpointer().restore(os.path.join(out, "checkpoints", str(step), "state"))
    return step, {k: np.asarray(v) for k, v in _flat(tree).items()}


def _flat(tree, prefix=""):
    out = {}
    for k, v in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if isinstance(v, (dict, list, tuple)):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_run_writes_everything_and_learns(reference_run):
    out = reference_run
    step_rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 13))
    for key in ("loss", "ce", "z_loss", "mtp", "indexer_kl", "balance", "lr", "grad_norm", "tokens_per_sec",
                "mfu"):
        assert key in step_rows[-1], key
    # Recall every step of the dense warm-up (steps 1-3), then measured at the eval steps only.
    assert [r["step"] for r in step_rows if "indexer_recall" in r] == [1, 2, 3, 5, 10, 12]
    assert all(0.0 < r["indexer_recall"] <= 1.0 for r in step_rows if "indexer_recall" in r)
    assert "real_experts_per_token" in step_rows[4] and "eval_loss" in step_rows[4]
    summary = json.load(open(out / "summary.json"))
    assert summary["held_out_loss_end"] < summary["held_out_loss_start"] - 0.5
    for name in ("loss_curve.png", "sample.txt", "tokenizer.json", "events.log", "run_config.json"):
        assert (out / name).exists(), name
    saved = json.load(open(out / "run_config.json"))
    assert saved["steps"] == 12 and saved["seq_len"] == 32 and saved["data"] == os.path.abspath(saved["data"])
    # Throughput from steady steps only: the three programs (warm-up, sparse, sparse measuring recall) were
    # each built in a step that is reported as such and left out.
    events = (out / "events.log").read_text()
    assert events.count("program compiled (or loaded from the cache)") == 3
    assert all(r["step_time"] > 0 for r in step_rows) and summary["steady_steps"] == 12 - 3
    # MFU against the matmul rate measured at the start; on this CPU a tiny model reaches a few per cent.
    assert 0.0 < summary["mfu"] < 1.0 and summary["matmul_flops_per_sec"] > 1e9
    assert step_rows[-1]["mfu"] == pytest.approx(summary["mfu"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert not any(r["skipped"] for r in step_rows)  # ABFT on, no fault: no false alarm


def test_existing_run_needs_resume(reference_run, corpus):
    assert _run(reference_run, corpus, steps=12) == 2


def test_resume_refuses_a_changed_setting(reference_run, corpus, capsys):
    """Before any data is read or program compiled: one line naming the setting and the way to allow it."""
    assert _run(reference_run, corpus, *REFERENCE, "--resume", steps=14) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "started with --steps 12, not 14" in err and "--allow-change steps" in err
    same = ["--out", str(reference_run), "--data", corpus, *REFERENCE, *FAST, "--resume"]
    args = train.parse_args([*same, "--steps", "14", "--allow-change", "steps"])
    assert run_settings.check_resume(args) is None
    args = train.parse_args([*same, "--steps", "12", "--seq-len", "64"])
    assert "--seq-len 32, not 64" in run_settings.check_resume(args)


@pytest.mark.parametrize("steps,warmup,indexer,line", [
    (600, None, None, "warm-up 50 steps, then cosine decay to step 600; dense indexer warm-up steps 1-50, "
                      "sparse attention from step 51"),
    (30, None, None, "warm-up 3 steps, then cosine decay to step 30; dense indexer warm-up steps 1-7, "
                     "sparse attention from step 8"),
    (30, "40", "0.5", "warm-up 29 steps, then cosine decay to step 30; dense indexer warm-up steps 1-15"),
    (30, "0.2", "30", "warm-up 6 steps, then cosine decay to step 30; dense attention for the whole run"),
])
def test_warmups_fit_the_run(steps, warmup, indexer, line):
    """Defaults are capped to a share of the run, fractions scale with it, step counts are capped to it."""
    flags = ["--steps", str(steps)] + (["--warmup-steps", warmup] if warmup else []) + (
        ["--indexer-warmup-steps", indexer] if indexer else [])
    args = train.parse_args(flags)
    lr = run_settings.resolve_warmup("warmup_steps", args.warmup_steps, steps)
    dense = run_settings.resolve_warmup("indexer_warmup_steps", args.indexer_warmup_steps, steps)
    assert line in run_settings.describe_schedule(args, lr, dense)


@pytest.mark.parametrize("files,target,message", [
    ({}, ".", "contains no files"),
    ({"x.bin": b"ok\xff"}, ".", "x.bin: not valid UTF-8"),
    ({"c.jsonl": b'{"text": "a"}\n{"text": \n'}, "c.jsonl", "c.jsonl:2: invalid JSON"),
    ({"c.jsonl": b'{"text": "a"}\n{"txt": "b"}\n'}, "c.jsonl", 'c.jsonl:2: expected an object with a string'),
])
def test_bad_data_is_one_line(tmp_path, capsys, files, target, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    assert _run(tmp_path / "run", str(folder / target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)


def test_deterministic_reruns_and_sigkill_resume(reference_run, tmp_path, corpus):
    """A rerun killed with SIGKILL after step 9 and resumed reaches the reference run's state bit for bit: its
    losses before the kill show the rerun agrees, those after it that the resume does."""
    a, c = reference_run, tmp_path / "c"
    step_a, params_a = _checkpoint_arrays(a)
    proc = _start(c, corpus)
    _wait_for_step(proc, c, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _run(c, corpus, *REFERENCE, "--resume", steps=12) == 0
    # Repeated runs in one process add the deterministic XLA flags once (they key the compilation cache).
    assert os.environ["XLA_FLAGS"].split().count(DETERMINISTIC_XLA_FLAGS[0]) == 1
    step_c, params_c = _checkpoint_arrays(c)
    assert step_a == step_c == 12 and params_a.keys() == params_c.keys()
    for k in params_a:
        np.testing.assert_array_equal(params_a[k], params_c[k], err_msg=k)
    resumed = {s: (loss, ce) for s, loss, ce in _losses(c)}
    for s, loss, ce in _losses(a):
        assert resumed[s] == (loss, ce), s
    # Steps logged after the checkpoint it resumed from (4 or 8: the kill may land before 8 is finalised) were
    # done again after the resume: each step is logged once, and events.log says which were dropped.
    assert [s for s, _, _ in _losses(c)] == list(range(1, 13))
    dropped = re.search(r"continuing from step (\d+): dropped the logged metrics of steps (\d+)-(\d+)",
                        (c / "events.log").read_text())
    assert dropped and int(dropped[1]) in (4, 8) and int(dropped[2]) == int(dropped[1]) + 1
    assert int(dropped[3]) >= 9


def _start(out, corpus):
    """train.py in a subprocess, with the reference flags and 12 steps (their programs are in the cache); its
    stderr goes to OUT.stderr (a file: a pipe nobody reads could fill and stall it)."""
    cmd = [sys.executable, "train.py", "--out", str(out), "--data", corpus, "--steps", "12", *REFERENCE,
           *FAST]
    with open(f"{out}.stderr", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for_step(proc, out, step):
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= step and "loss" in r
                                                    for r in read_metrics(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run ended (or hung) before step {step}")


def test_ctrl_c_saves_the_current_step_and_exits_within_seconds(tmp_path, corpus):
    out = tmp_path / "run"
    proc = _start(out, corpus)
    _wait_for_step(proc, out, 6)
    t = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130 and time.time() - t < 20
    assert "SIGINT received: stopping after the current step" in open(f"{out}.stderr").read()
    last = max(r["step"] for r in read_metrics(out) if "loss" in r)
    assert max(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == last < 12
    assert f"step {last}: SIGINT: checkpoint saved, stopping" in (out / "events.log").read_text()
    assert json.load(open(out / "summary.json"))["held_out_loss_end"] is None  # no closing eval


def test_ctrl_c_before_training_leaves_nothing_to_resume(tmp_path, corpus):
    """Interrupted while it loads: exit 130, no checkpoint: the same command runs again without --resume."""
    out = tmp_path / "run"
    proc = _start(out, corpus)
    deadline = time.time() + 300
    while "loading data" not in open(f"{out}.stderr").read() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    err = open(f"{out}.stderr").read()
    assert "SIGINT received" in err and "Traceback" not in err
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_nan_gradient_is_skipped_then_restored_and_training_continues(tmp_path, corpus, capsys):
    """nan-grad@5: the guard skips the update; with --max-bad-steps 1 the last good checkpoint (step 4) is
    restored (offloaded optimizer state included), the transient fault does not recur, the run finishes.
    Output that is not a terminal gets plain progress lines; --profile-steps writes a profiler trace."""
    out = tmp_path / "run"
    fault = ["--inject-fault", "nan-grad@5", "--max-bad-steps", "1"]
    fault += ["--log-every", "4", "--profile-steps", "2:3"]
    progress = [f for f in FAST if f != "--no-progress"]
    flags = ["--out", str(out), "--data", corpus, "--steps", "12", *progress, *REFERENCE, *fault]
    assert train.main(flags) == 0
    printed = capsys.readouterr().out
    assert "step 8/12  loss " in printed and "step 12/12  loss " in printed and "\r" not in printed
    assert any(name.endswith(".xplane.pb") for _, _, names in os.walk(out / "profile") for name in names)
    # Steps 5-6 ran, were abandoned by the restore and replayed: metrics.jsonl keeps only the replay.
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13)) and not any(r["skipped"] for r in rows)
    events = (out / "events.log").read_text()
    assert "skipped update" in events and "restored checkpoint of step 4" in events
    assert "dropped the logged metrics of steps 5-6" in events
    assert np.isfinite(rows[-1]["loss"])


# The mesh runs share flags and step count, so they compile one set of 8-device programs: one training program
# (no dense indexer warm-up), ABFT on because the bitflip run needs it.
MESH_RUN = ["--mesh", "dp=2,tp=2,ep=2", "--deterministic", "--abft", "--sample-tokens", "0",
            "--indexer-warmup-steps", "0"]


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, corpus):
    """Two 6-step runs, same seed, on the mesh: a clean one, and one with bitflip@5 (the sixth step)."""
    clean, flipped = tmp_path_factory.mktemp("mesh_clean"), tmp_path_factory.mktemp("mesh_bitflip")
    assert _run(clean, corpus, *MESH_RUN, steps=6) == 0
    assert _run(flipped, corpus, *MESH_RUN, "--inject-fault", "bitflip@5", steps=6) == 0
    return clean, flipped


def test_deterministic_on_a_mesh(mesh_runs):
    """The two runs agree bit for bit until the fault hits step 6: the losses of steps 1-5 (step 5, an eval
    step, runs the program that also measures the selection recall) and every array of the step-4 checkpoint
    (parameters and ZeRO-1 optimizer state)."""
    clean, flipped = mesh_runs
    assert [s for s, _, _ in _losses(clean)][:5] == [1, 2, 3, 4, 5]
    assert _losses(clean)[:5] == _losses(flipped)[:5]
    _, pa = _checkpoint_arrays(clean, step=4)
    _, pb = _checkpoint_arrays(flipped, step=4)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_bitflips_are_caught_on_a_mesh(mesh_runs):
    """bitflip@5 on a dp=2 mesh: the ABFT checksum catches the flipped LM-head output (update skipped), and
    the cross-replica fingerprint catches the flipped parameter copy (last good checkpoint restored)."""
    out = mesh_runs[1]
    events = (out / "events.log").read_text()
    assert "step 6: skipped update" in events and "abft mismatch True" in events
    assert "fingerprint mismatch" in events and "restored checkpoint of step 4" in events
    rows = [r for r in read_metrics(out) if "loss" in r]  # the replayed steps 5-6 only
    assert [r["step"] for r in rows] == list(range(1, 7)) and not any(r["skipped"] for r in rows)


def test_every_flag_has_help():
    missing = [a.option_strings[0] for a in train.build_parser()._actions if not a.help]
    assert not missing, missing


@pytest.mark.parametrize("flags,message", [
    (["--mesh", "dp=3"], "needs 3 devices"),
    (["--mesh", "zz=2"], "unknown mesh axis"),
    (["--data", "/nonexistent/corpus"], "no such file"),
    (["--inject-fault", "melt@3"], "bad fault spec"),
    (["--steps", "0"], "must be >= 1"),
    (["--batch-size", "3", "--mesh", "dp=2,tp=4"], "must divide"),
    (["--mesh", "dp=2,cp=4", "--seq-len", "30"], "size 30) is not divisible by mesh axis 'cp'"),
])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


# --- fine-tuning and evaluation -----------------------------------------------------------------------------


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
    assert _run(out, corpus, *REFERENCE, "--init-from", str(reference_run), "--prompt", "def f(",
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
    assert _run(out, corpus, "--init-from", str(reference_run), "--preset", "small", steps=12) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --init-from {reference_run}: its model differs from this run's (--preset "
                          "small, vocabulary 384 from the tokenizer): ")
    assert "hidden_size 64 (this run: 512)" in err and "num_layers 2 (this run: 4)" in err
    assert not (out / run_settings.SETTINGS_FILE).exists() and not os.listdir(out / "checkpoints")


def test_init_from_refuses_another_vocabulary(reference_run, corpus):
    """Same sizes, other tokens: a run's weights need its own tokenizer."""
    tokenizer = data.load_or_train_tokenizer(str(reference_run), [], 300)
    cfg = model_config(train.parse_args(["--kernel-impl", "xla"]),
                       types.SimpleNamespace(tokenizer=tokenizer, eos=data.eos_id(tokenizer)))
    weights, where = load_init_weights(str(reference_run), cfg, tokenizer, "tiny")
    assert where == f"step 12 of {reference_run}" and "embed" in weights
    other = data.train_bpe(data.read_text_files(sorted(data.stdlib_files())[:4]), 300)
    with pytest.raises(SettingError, match="its tokenizer .* is not this run's"):
        load_init_weights(str(reference_run), cfg, other, "tiny")


def test_init_from_hugging_face_and_orbax_folders(reference_run, tmp_path):
    """The reference run exported as a Hugging Face folder, and that as an Orbax folder: each is recognised,
    checked against the run's model and yields the run's weights; the HF folder's tokenizer is the default."""
    hf, orbax = tmp_path / "hf", tmp_path / "orbax"
    assert convert.main(["--run", str(reference_run), "--out", str(hf)]) == 0
    assert convert.main(["--hf", str(hf), "--out", str(orbax)]) == 0
    tokenizer = data.load_or_train_tokenizer(str(reference_run), [], 300)
    cfg = model_config(train.parse_args([]), types.SimpleNamespace(tokenizer=tokenizer,
                                                                   eos=data.eos_id(tokenizer)))
    want, _ = load_init_weights(str(reference_run), cfg, tokenizer, "tiny")
    assert [init_source_kind(str(p)) for p in (reference_run, reference_run / "checkpoints",
                                                reference_run / "checkpoints" / "12", hf, orbax)] == [
        "run", "run", "run", "hf", "orbax"]
    assert init_source_tokenizer(str(hf), "hf") == str(hf / "tokenizer.json")
    assert init_source_tokenizer(str(reference_run / "checkpoints"), "run") == str(
        reference_run / "tokenizer.json")
    assert init_source_tokenizer(str(orbax), "orbax") is None
    for source in (hf, orbax):
        got, where = load_init_weights(str(source), cfg, tokenizer, "tiny")
        assert str(source) in where
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    with pytest.raises(SettingError, match=r"num_layers 2 \(this run: 4\)"):
        load_init_weights(str(orbax), cfg.replace(num_layers=4), tokenizer, "tiny")


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
    assert _run(out, corpus, *REFERENCE, "--eval-only", "--init-from", source, steps=12) == 0
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
    assert model_config(train.parse_args([]), corpus).capacity_factor is None  # dropless
    cfg = model_config(train.parse_args(["--capacity-factor", "1.25", "--preset", "small"]), corpus)
    assert (cfg.capacity_factor, cfg.vocab_size, cfg.num_layers) == (1.25, 384, 4)
    # A defining setting: resuming with another capacity is refused unless allowed.
    saved = train.parse_args(["--out", str(tmp_path), "--capacity-factor", "1.25"])
    run_settings.save(saved, model_config(saved, corpus))
    args = train.parse_args(["--out", str(tmp_path), "--resume"])
    assert "started with --capacity-factor 1.25, not (default)" in run_settings.check_resume(args)
    args = train.parse_args(["--out", str(tmp_path), "--resume", "--allow-change", "capacity-factor"])
    assert run_settings.check_resume(args) is None
    with pytest.raises(SystemExit):
        train.parse_args(["--capacity-factor", "0"])
    assert "--capacity-factor must be > 0" in capsys.readouterr().err


# --- The closing sample's prompt ----------------------------------------------------------------------------


def test_default_prompt_is_the_start_of_held_out_text(reference_run, corpus):
    assert held_out_prompt(["", "\n  \nimport os\nimport sys\n\n\ndef main():\n    pass\n"]) == \
        "import os\nimport sys\n\n\ndef main():\n    pass\n"
    lines = [f"line number {i}\n" for i in range(10)]  # 14 characters each
    assert held_out_prompt(["".join(lines)]) == "".join(lines[:4])  # whole lines, at most 60 characters
    assert held_out_prompt(["word " * 30]) == ("word " * 12).rstrip()  # one long line: cut at a space
    assert held_out_prompt(["x" * 80]) == "x" * 60 and held_out_prompt(["  ", ""]) == ""
    assert train.parse_args([]).prompt is None  # --prompt still overrides
    # The reference run (no --prompt) continued its first held-out document.
    _, held_out = data.split_documents(data.load_documents(corpus))
    prompt = held_out_prompt(held_out)
    assert prompt and prompt in held_out[0][:200]
    assert (reference_run / "sample.txt").read_text().startswith(prompt)
