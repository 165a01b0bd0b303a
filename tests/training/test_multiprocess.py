"""A run across processes (JAX's multi-controller runtime over localhost, CPU collectives through gloo): two
processes of 4 simulated devices each train like one process of 8 on the same mesh, write the run's files
once, checkpoint, and resume."""

import os
import socket
import subprocess
import sys

import numpy as np

import train
from longcat_jax.training.run_log import read_metrics
from tests.training.conftest import FAST

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A one-layer model without indexer, MTP or N-gram keeps the compiles short; the mesh has every kind of axis
# the step communicates over (dp gradients, tp activations, ep experts).
RUN = [*FAST, "--indexer-warmup-steps", "0", "--sample-tokens", "0", "--mesh", "dp=2,tp=2,ep=2",
       "model.num_layers=1", "model.use_indexer=false", "model.si_enabled=false", "model.hi_enabled=false",
       "model.mtp_num_steps=0", "model.ngram_n=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(out, corpus, *extra):
    """train.py as processes 0 and 1 of one run; returns their exit statuses and stderr."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
    procs = []
    for i in range(2):
        cmd = [sys.executable, "train.py", "--out", str(out), "--data", corpus, *RUN, *extra,
               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=900) for p in procs]
    return [p.returncode for p in procs], [err for _, err in results]


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(["--out", str(one), "--data", corpus, "--steps", "4", *RUN]) == 0
    codes, errs = _two_processes(two, corpus, "--steps", "4")
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert list(_losses(two)) == [1, 2, 3, 4]  # one writer: each step once
    np.testing.assert_allclose(list(_losses(two).values()), list(_losses(one).values()), rtol=1e-5)
    assert sorted(os.listdir(two / "checkpoints")) == ["4"]
    # Both processes stop, then resume together from the step-4 checkpoint and run two more steps.
    codes, errs = _two_processes(two, corpus, "--steps", "6", "--resume", "--allow-change", "steps")
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "restored step 4" in errs[0] and "restored step 4" in errs[1]
    assert list(_losses(two)) == [1, 2, 3, 4, 5, 6] and np.all(np.isfinite(list(_losses(two).values())))
