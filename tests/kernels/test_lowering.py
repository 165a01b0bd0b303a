"""Every Pallas kernel, forward and backward, lowers for a GPU through Triton, checked on this CPU machine.

`impl.lowering_for("gpu")` builds the kernels compiled (not interpreted) with Triton's launch parameters, and
`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' Triton lowering: it raises on any
operation Triton cannot take (lax.top_k, sort, gather, value slicing, a matrix-vector dot, a tile that is not
a power of two). Shapes are the `small` preset's tiles, as `bench/lsa.py` and training use them. Compiling
the Triton IR to PTX is `bench/triton_ptx.py` (it needs the `triton` package); running it needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.gpu_cases import CASES, kernel_cases
from longcat_jax.config import Config
from pallas_kernels import impl

TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_gpu(fn, args) -> str:
    with impl.lowering_for("gpu"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", CASES)
def test_kernel_lowers_to_triton(name):
    fn, args, n_kernels = kernel_cases(Config.small())[name]
    text = lower_for_gpu(fn, args)
    assert text.count(TRITON_CALL) == n_kernels


def test_lowering_for_builds_compiled_kernels_and_restores():
    assert impl.interpret() and impl.resolve("auto") == "xla"  # this machine: CPU
    with impl.lowering_for("gpu"):
        assert not impl.interpret() and impl.resolve("auto") == "pallas"
        assert impl.compiler_params() is not None
    assert impl.interpret() and impl.compiler_params() is None
    with pytest.raises(ValueError, match="platform must be one of"):
        with impl.lowering_for("cuda"):
            pass


def test_an_unlowerable_kernel_is_caught():
    """The check has teeth: a kernel calling lax.top_k (the indexer's old merge) does not lower."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = jax.lax.top_k(x_ref[...], 16)[1]

    def call(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.int32),
                              compiler_params=impl.compiler_params(), interpret=impl.interpret())(x)

    with pytest.raises(NotImplementedError, match="top_k"):
        lower_for_gpu(call, (jnp.asarray(np.zeros((16, 64), np.float32)),))
