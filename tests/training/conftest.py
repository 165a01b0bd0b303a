"""The reference training run and its corpus, for the train.py tests (test_train.py): session-scoped, so the
run is trained once per worker process."""

import os
import shutil

import pytest

import train
from longcat_jax.training import data

FAST = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--eval-every", "5",
        "--eval-batches", "2", "--save-every", "4", "--warmup-steps", "2", "--indexer-warmup-steps", "3",
        "--sample-tokens", "4", "--no-progress"]

# Every single-device run of the train.py tests uses these flags and 12 steps, so they compile one set of
# programs (a fault step is a runtime input). The kernel path runs: the blockwise dense warm-up for 3 steps,
# then LSA, with activation and optimizer-state offload, so the resume and restore tests also cover those.
REFERENCE = ["--deterministic", "--abft", "--kernel-impl", "xla", "--remat", "offload", "--offload-optimizer"]


def run_train(out, corpus, *extra, steps=10):
    return train.main(["--out", str(out), "--data", corpus, "--steps", str(steps), *FAST, *extra])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few real stdlib sources, so tests do not tokenize the whole library."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in data.stdlib_files()[:40]:
        shutil.copy(path, folder / os.path.basename(path))
    return str(folder)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, corpus):
    """One deterministic 12-step run, shared by the tests (its folder is only read, or written beside)."""
    out = tmp_path_factory.mktemp("reference")
    assert run_train(out, corpus, *REFERENCE, steps=12) == 0
    return out
