"""train.py end to end: outputs, determinism, exact resume after SIGKILL, fault guards, flag errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from longcat_jax.training import data
from longcat_jax.training.loop import DETERMINISTIC_XLA_FLAGS
from longcat_jax.training.run_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--eval-every", "5",
        "--eval-batches", "2", "--save-every", "4", "--warmup-steps", "2", "--indexer-warmup-steps", "3",
        "--sample-tokens", "4", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real stdlib sources, so tests do not tokenize the whole library."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in data.stdlib_files()[:40]:
        shutil.copy(path, folder / os.path.basename(path))
    return str(folder)


def _run(out, corpus, *extra, steps=10):
    return train.main(["--out", str(out), "--data", corpus, "--steps", str(steps), *FAST, *extra])


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


# Every single-device run below uses these flags and 12 steps, so they compile one set of programs (a fault
# step is a runtime input). The kernel path runs: the blockwise dense warm-up for 3 steps, then LSA, with
# activation and optimizer-state offload, so the resume and restore tests also cover those.
REFERENCE = ["--deterministic", "--abft", "--kernel-impl", "xla", "--remat", "offload", "--offload-optimizer"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus):
    """One deterministic 12-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("reference")
    assert _run(out, corpus, *REFERENCE, steps=12) == 0
    return out


def test_run_writes_everything_and_learns(reference_run):
    out = reference_run
    step_rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 13))
    for key in ("loss", "ce", "z_loss", "mtp", "indexer_kl", "balance", "lr", "grad_norm", "tokens_per_sec"):
        assert key in step_rows[-1], key
    # Recall every step of the dense warm-up (steps 1-3), then measured at the eval steps only.
    assert [r["step"] for r in step_rows if "indexer_recall" in r] == [1, 2, 3, 5, 10, 12]
    assert all(0.0 < r["indexer_recall"] <= 1.0 for r in step_rows if "indexer_recall" in r)
    assert "real_experts_per_token" in step_rows[4] and "eval_loss" in step_rows[4]
    summary = json.load(open(out / "summary.json"))
    assert summary["held_out_loss_end"] < summary["held_out_loss_start"] - 0.5
    for name in ("loss_curve.png", "sample.txt", "tokenizer.json", "events.log"):
        assert (out / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert not any(r["skipped"] for r in step_rows)  # ABFT on, no fault: no false alarm


def test_existing_run_needs_resume(reference_run, corpus):
    assert _run(reference_run, corpus, steps=12) == 2


def test_deterministic_reruns_and_sigkill_resume(reference_run, tmp_path, corpus):
    """A rerun killed with SIGKILL after step 9 and resumed reaches the reference run's state bit for bit: its
    losses before the kill show the rerun agrees, those after it that the resume does."""
    a, c = reference_run, tmp_path / "c"
    step_a, params_a = _checkpoint_arrays(a)
    cmd = [sys.executable, "train.py", "--out", str(c), "--data", corpus, "--steps", "12", *REFERENCE, *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = c / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= 9 and "loss" in r for r in read_metrics(c)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
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


def test_nan_gradient_is_skipped_then_restored_and_training_continues(tmp_path, corpus):
    """nan-grad@5: the guard skips the update; with --max-bad-steps 1 the last good checkpoint (step 4) is
    restored (offloaded optimizer state included), the transient fault does not recur, the run finishes."""
    out = tmp_path / "run"
    fault = ["--inject-fault", "nan-grad@5", "--max-bad-steps", "1"]
    assert _run(out, corpus, *REFERENCE, *fault, steps=12) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, *range(5, 13)]  # 5-6 replayed after the restore
    assert rows[5]["skipped"] and not any(r["skipped"] for r in rows[6:])
    events = (out / "events.log").read_text()
    assert "skipped update" in events and "restored checkpoint of step 4" in events
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
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[5]["step"] == 6 and rows[5]["skipped"] and rows[5]["abft_mismatch"]
    assert not any(r["skipped"] for r in rows[6:]) and rows[-1]["step"] == 6
    events = (out / "events.log").read_text()
    assert "fingerprint mismatch" in events and "restored checkpoint of step 4" in events


@pytest.mark.parametrize("flags,message", [
    (["--mesh", "dp=3"], "needs 3 devices"),
    (["--mesh", "zz=2"], "unknown mesh axis"),
    (["--data", "/nonexistent/corpus"], "no such file"),
    (["--inject-fault", "melt@3"], "bad fault spec"),
    (["--steps", "0"], "must be >= 1"),
    (["--batch-size", "3", "--mesh", "dp=2,tp=4"], "must divide"),
])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err
