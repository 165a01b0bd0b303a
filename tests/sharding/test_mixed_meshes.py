"""Mixed meshes, each axis its own mechanism at once: a training step's loss terms, expert loads and gradients
on `pp=2,cp=2,vp=2` (pipeline, balanced context parallelism, row-sharded N-gram tables) and on `ep=4,tp=2`
(expert all-to-all with tensor-parallel experts) equal one device's. The axes alone are tested beside their
code (tests/model/test_pipeline.py, test_context_parallel.py, test_moe_ep.py, test_ngram.py)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
from longcat_jax.training.train_step import LossSettings, accumulated_grads
from sharding.mesh import make_mesh
from tests.helpers import packed_batch, rel_err

# Every feature on (N-gram for vp, indexer with SI / CLI / HI, MTP); 8 experts so that ep=4 divides them. One
# MTP step keeps the compile short.
CFG = lj.Config.tiny(n_routed_experts=8, mtp_num_steps=1)
# The balance loss is exact here (one microbatch), but its gradient is tiny: weight it like the rest.
SETTINGS = LossSettings(balance_weight=1.0)
ROWS, T = 2, 32


def _batch():
    """Two rows: one with two packed documents, one ending in padding."""
    return packed_batch(CFG.vocab_size, ROWS, T, second_doc={0: 19}, padding={1: 27})


def _grads(params, graphdef):
    return accumulated_grads(params, _batch(), 1, graphdef=graphdef, cfg=CFG, settings=SETTINGS)


@pytest.fixture(scope="module")
def one_device():
    graphdef, params = nnx.split(lj.build_model(CFG, seed=0))
    return jax.jit(functools.partial(_grads, graphdef=graphdef))(params)


@pytest.mark.parametrize("sizes", [{"pp": 2, "cp": 2, "vp": 2}, {"ep": 4, "tp": 2}],
                         ids=["pp2-cp2-vp2", "ep4-tp2"])
def test_mixed_mesh_step_equals_one_device(sizes, one_device):
    """Loss terms to 1e-5 relative (1e-7 absolute: the indexer KL is about 2e-4), expert loads exactly, every
    gradient to a relative norm error of 1e-4."""
    mesh = make_mesh(sizes)
    graphdef, params = nnx.split(lj.build_model(CFG, seed=0, mesh=mesh))
    with jax.set_mesh(mesh):
        g2, (t2, load2, _) = jax.jit(functools.partial(_grads, graphdef=graphdef))(params)
    g1, (t1, load1, _) = one_device
    np.testing.assert_array_equal(load1, load2)
    for k in ("loss", "ce", "z_loss", "mtp", "indexer_kl", "balance"):
        np.testing.assert_allclose(t2[k], t1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2), strict=True):
        assert rel_err(b, a) < 1e-4, (sizes, jax.tree_util.keystr(path))
