"""The backend choice in pallas_kernels/impl.py: which Pallas kernels "pallas" (and "auto") mean where."""

from __future__ import annotations

import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import impl


def test_backend_per_platform_and_context():
    assert impl.platform() == "cpu" and impl.backend() == "triton" and impl.resolve("auto") == "xla"
    assert impl.interpret() and isinstance(impl.tpu_interpret(), pltpu.InterpretParams)
    with impl.lowering_for("tpu"):  # compiled Mosaic kernels, for the TPU lowering check
        assert impl.backend() == "mosaic" and impl.resolve("auto") == "pallas"
        assert not impl.interpret() and impl.tpu_interpret() is False and impl.compiler_params() is None
    with impl.interpreting("tpu"):  # the Mosaic kernels under the TPU interpreter
        assert impl.backend() == "mosaic" and impl.resolve("auto") == "pallas"
        assert isinstance(impl.tpu_interpret(), pltpu.InterpretParams)
    with impl.lowering_for("gpu"):
        assert impl.backend() == "triton" and not impl.interpret() and impl.compiler_params() is not None
    with impl.interpreting("gpu"):  # Triton's parameters, run by the generic interpreter
        assert impl.backend() == "triton" and impl.interpret() and impl.compiler_params() is not None
    assert impl.backend() == "triton" and impl.interpret()  # every context restored
    with impl.interpreting("tpu"):  # no Mosaic kernel yet: XLA for auto, an error for pallas
        assert impl.resolve("auto", mosaic=False) == "xla" and impl.resolve("xla", mosaic=False) == "xla"
        with pytest.raises(NotImplementedError, match="no TPU"):
            impl.resolve("pallas", mosaic=False)
    assert impl.resolve("pallas", mosaic=False) == "pallas"  # on CPU: the Triton kernels, interpreted
    with pytest.raises(ValueError, match="platform must be one of"):
        with impl.interpreting("cuda"):
            pass


def test_auto_on_a_tpu_mesh_leaves_mosaic_kernels_to_their_own_shard_map():
    """Under a mesh of several devices XLA would have to partition a Mosaic kernel, which Mosaic refuses:
    there "auto" is XLA, except for an entry point that runs its kernel in its own shard_map."""
    import jax

    from sharding.mesh import make_mesh

    with impl.lowering_for("tpu"), jax.set_mesh(make_mesh({"tp": 8})):
        assert impl.resolve("auto") == "xla" and impl.resolve("pallas") == "pallas"
        assert impl.resolve("auto", partitions_itself=True) == "pallas"
    with impl.lowering_for("tpu"), jax.set_mesh(make_mesh({"tp": 1}, devices=jax.devices()[:1])):
        assert impl.resolve("auto") == "pallas"  # one device: nothing to partition
