"""Executes notebooks/quickstart.ipynb end to end with nbclient, so the quickstart never rots.

The kernel is this interpreter (the project's venv), launched from a kernelspec written to a temporary folder
and found through a kernel-spec manager that looks only there: a user-level or system "python3" kernelspec
pointing at another Python cannot shadow it. The kernel inherits this process's environment (conftest XLA
flags and compilation cache) and runs in the repository root.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (a dependency of nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "longcat-jax-test"
LOSS_LINE = re.compile(r"next-token loss: first ([0-9.]+), final ([0-9.]+) after (\d+) steps")


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "longcat-jax test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _images(cells) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the quickstart has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"


def test_quickstart_runs_and_loss_falls(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,  # per cell; the train cell compiles the step
        startup_timeout=120,
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    printed = "\n".join(_stream_text(c) for c in code)
    m = LOSS_LINE.search(printed)
    assert m, f"the training cell did not print its loss line; printed:\n{printed}"
    first, final, steps = float(m[1]), float(m[2]), int(m[3])
    assert steps == 50
    assert final < first - 0.3, f"training did not lower the loss: {first} -> {final}"
    # The loss curve and the LSA heatmap.
    assert _images(code) == 2, f"expected 2 figures, got {_images(code)}"
    assert re.search(r"attends to at most (\d+) keys", printed), printed
    # 48 greedy tokens after the prompt; 50 steps often give only indentation, so check that text came out.
    generated = _stream_text(code[-1])
    start = "def fibonacci(n):\n"
    assert generated.startswith(start) and len(generated) > len(start) + 1, generated
