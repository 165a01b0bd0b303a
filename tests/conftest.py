"""Test set-up: simulated CPU devices for mesh tests (must be set before jax initialises)."""

import gc
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reruns of the same program (determinism and resume tests, subprocesses included) reuse compiled executables.
# jax reads these when it is imported, so they come before the import below.
_CACHE = os.path.join(tempfile.gettempdir(), "longcat-jax-test-xla-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# `train.py --deterministic` adds these flags when a run starts; XLA reads them when the backend starts, into
# the compile options that key the compilation cache. Starting every test process with them makes this process
# and the train.py subprocesses compile with the same options, so each reuses the other's programs.
from longcat_jax.training.loop import with_deterministic_flags  # noqa: E402  (jax starts no backend on import)

os.environ["XLA_FLAGS"] = with_deterministic_flags(os.environ["XLA_FLAGS"])

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program when a test file ends.

    XLA:CPU maps each executable's machine code into its own memory regions. A suite that keeps all of them
    alive in one process approaches the kernel's limit of 65530 mappings (`vm.max_map_count`), and the next
    compile then aborts or segfaults inside XLA. Reruns within a file still hit the in-memory caches; across
    files the persistent compilation cache above keeps recompiles cheap.
    """
    yield
    jax.clear_caches()
    gc.collect()


# `make test` spreads whole files over two worker processes (pytest-xdist, --dist loadfile). These files take
# the longest, so they start first and the other files fill the second worker meanwhile.
_SLOWEST_FILES = ("test_train.py", "test_model_kernel_path.py", "test_notebook.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _SLOWEST_FILES.index(name) if name in _SLOWEST_FILES else len(_SLOWEST_FILES)

    items.sort(key=rank)  # stable: the order inside each file is kept
