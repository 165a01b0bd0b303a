"""Context parallelism (longcat_jax/model/context_parallel.py): the balanced layout, and a training step on cp
meshes equal to one device.

The training step runs on packed documents (three in one row, padding at the end of the other) with every
feature of Config.tiny on (SI, CLI, HI above 24 keys, MTP with one step: its attention runs in natural order),
on the reference path and on the kernel path. Its compiled program all-gathers the latent keys over cp and
nothing of [T, T] size.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import longcat_jax as lj
from longcat_jax.model import context_parallel
from longcat_jax.training.train_step import LossSettings, compute_loss
from sharding.mesh import make_mesh, parse_mesh
from sharding.rules import RULES, override_rules
from tests.helpers import rel_err

CFG = lj.Config.tiny(mtp_num_steps=1)  # one MTP step: a quarter less to compile, the same CP code paths
# 48 tokens: HI runs (more than 24 keys), the chunks of cp=2 (12 tokens) and the SI window (4) straddle the
# documents, and T differs from the model width (64), so an all-gather's shape says what it gathers.
B, T = 2, 48
LOSS_AND_GRAD = jax.jit(jax.value_and_grad(compute_loss, has_aux=True), static_argnums=(1, 3, 4),
                        static_argnames=("measure_recall", "dense_attention"))


def _mesh(text):
    sizes = parse_mesh(text)
    return make_mesh(sizes, devices=jax.devices()[: math.prod(sizes.values())])


def test_balance_order():
    perm, inverse = context_parallel.balance_order(8, 2)
    assert perm.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]  # shard 0: chunks 0 and 3; shard 1: chunks 1 and 2
    assert perm[inverse].tolist() == list(range(8))
    assert context_parallel.balance_order(16, 4)[0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11,
                                                                   6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2 x cp = 4"):
        context_parallel.balance_order(30, 2)


def test_layout_follows_the_rules():
    assert context_parallel.balanced_layout(T, RULES) is None  # no mesh
    with jax.set_mesh(_mesh("cp=4")):
        layout = context_parallel.balanced_layout(T, RULES)
        assert (layout.cp, layout.axis, layout.order) == (4, "cp", (0, 7, 1, 6, 2, 5, 3, 4))
        assert context_parallel.balanced_layout(T, override_rules("seq=none")) is None
        with pytest.raises(ValueError, match=r"sequence length 20 is not divisible by 2 x cp = 8"):
            context_parallel.balanced_layout(20, RULES)
    with jax.set_mesh(_mesh("dp=2")):
        assert context_parallel.balanced_layout(T, RULES) is None  # cp has size 1


def test_relayout_moves_chunks_without_gathering_the_row():
    """from_natural is x[:, perm] (chunks travel by ppermute, never an all-gather), to_natural undoes it, and
    rows of natural order map to the layout's."""
    mesh = _mesh("dp=2,cp=4")
    x = jnp.arange(B * T * 3, dtype=jnp.float32).reshape(B, T, 3)
    perm, inverse = context_parallel.balance_order(T, 4)
    with jax.set_mesh(mesh):
        layout = context_parallel.balanced_layout(T, RULES)
        x = jax.device_put(x, NamedSharding(mesh, P("dp", "cp")))
        there = jax.jit(layout.from_natural)
        laid = there(x)
        np.testing.assert_array_equal(laid, np.asarray(x)[:, perm])
        np.testing.assert_array_equal(jax.jit(layout.to_natural)(laid), x)
        assert "all-gather" not in there.lower(x).compile().as_text()
        rows = jnp.asarray([[-1, 0, 7, 40]])
        want = [[-1, inverse[0], inverse[7], inverse[40]]]
        np.testing.assert_array_equal(layout.to_layout_rows(rows), want)
        np.testing.assert_array_equal(layout.to_natural_rows(layout.to_layout_rows(rows)), rows)


def _packed_batch():
    """Row 0: one document, then 6 padding tokens; row 1: three documents (positions restart in each)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    seg[0, 42:], pos[0, 42:] = 0, 0
    seg[1, 10:], pos[1, 10:] = 2, np.arange(T - 10)
    seg[1, 35:], pos[1, 35:] = 3, np.arange(T - 35)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": pos, "segment_ids": seg,
            "loss_mask": (seg > 0).astype(np.float32)}


def _step(impl, mesh_text=None):
    """(loss terms, gradients, compiled HLO text or None) of one sparse-stage step (selection recall
    measured) on the packed batch, on one device or on the mesh."""
    cfg = CFG.replace(kernel_impl=impl)
    args = dict(measure_recall=True)
    if mesh_text is None:
        graphdef, params = nnx.split(lj.build_model(cfg, seed=0))
        batch = {k: jnp.asarray(v) for k, v in _packed_batch().items()}
        (_, (terms, _, _)), grads = LOSS_AND_GRAD(params, graphdef, batch, cfg, LossSettings(), **args)
        return terms, grads, None
    mesh = _mesh(mesh_text)
    graphdef, params = nnx.split(lj.build_model(cfg, seed=0, mesh=mesh))
    with jax.set_mesh(mesh):
        batch = {k: jax.device_put(v, NamedSharding(mesh, P("dp", "cp"))) for k, v in _packed_batch().items()}
        compiled = LOSS_AND_GRAD.lower(params, graphdef, batch, cfg, LossSettings(), **args).compile()
        (_, (terms, _, _)), grads = compiled(params, batch)
    return terms, grads, compiled.as_text()


CASES = [("reference", "cp=2"), ("xla", "cp=2,dp=2,tp=2")]


@pytest.fixture(scope="module")
def steps():
    """Each case's step on one device and on its mesh, computed once for the tests below (a compile takes
    ~30 s of CPU)."""
    return {case: (_step(case[0]), _step(*case)) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_training_step_equals_one_device(steps, case):
    """Every loss term and every gradient of the step on the mesh equal one device's: attention, selection
    (SI window and sinks, HI blocks, top-k ties), the indexer KL and recall over gathered keys with global
    positions, per document; MTP in natural order."""
    (want_terms, want_grads, _), (got_terms, got_grads, _) = steps[case]
    assert got_terms.keys() == want_terms.keys() and 0.5 < float(want_terms["indexer_recall"]) < 1.0
    for k, v in got_terms.items():
        np.testing.assert_allclose(float(v), float(want_terms[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) < 1e-4, jax.tree_util.keystr(path)


def _all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """The result shape of every all-gather in a compiled program's text."""
    shapes = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo)
    return [tuple(int(n) for n in dims.split(",")) for dims in shapes]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_step_gathers_the_latent_keys(steps, case):
    """The compiled step all-gathers the latents (R + Hr = 24 values per token) and the indexer keys (J = 16)
    over the whole sequence, and never a [T, T] array; on the mixed mesh (batch split over dp) not the hidden
    state either."""
    hlo = steps[case][1][2]
    gathers = _all_gathers(hlo)
    assert any(s[-2:] == (T, CFG.kv_lora_rank + CFG.qk_rope_head_dim) for s in gathers), gathers
    assert any(s[-2:] == (T, CFG.index_head_dim) for s in gathers), gathers
    assert not [s for s in gathers if s.count(T) >= 2], gathers
    if "dp" in case[1]:
        assert not [s for s in gathers if s[-2:] == (T, CFG.hidden_size)], gathers
