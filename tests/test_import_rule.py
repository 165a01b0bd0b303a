"""The one direction of dependence between the rooms (docs/architecture.md#import-rule), from the source."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = ("longcat_jax", "pallas_kernels", "sharding")

# Room -> the packages of ours its modules may import (a module of a room may always import its own room).
ALLOWED = {
    "sharding": ("sharding",),
    "longcat_jax/config.py": (),
    "longcat_jax/ops": ("longcat_jax.config", "longcat_jax.ops", "sharding"),
    "pallas_kernels": ("longcat_jax.config", "longcat_jax.ops", "pallas_kernels", "sharding"),
    "longcat_jax/model": ("longcat_jax.config", "longcat_jax.ops", "longcat_jax.model", "pallas_kernels",
                          "sharding"),
}


def _our_imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module]
    return [n for n in names if n.split(".")[0] in OURS]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_downwards(room):
    where = ROOT / room
    files = [where] if where.suffix == ".py" else sorted(where.rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in _our_imports(f)
           if not any(name == a or name.startswith(a + ".") for a in ALLOWED[room])]
    assert not bad, "\n".join(bad)


def test_a_kernel_imports_alone_and_the_package_loads_lazily():
    """A kernel imported first does not pull the model in (which would import the kernel back), and
    `import longcat_jax` loads neither the model nor a kernel until a public name is used."""
    code = (
        "import sys\n"
        "import pallas_kernels.ngram_lookup, pallas_kernels.sparse_mla\n"
        "assert 'longcat_jax.model.longcat' not in sys.modules\n"
        "import longcat_jax as lj\n"
        "assert 'longcat_jax.model.longcat' not in sys.modules\n"
        "lj.build_model\n"
        "assert 'longcat_jax.model.longcat' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
