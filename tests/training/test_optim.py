"""Optimizer tests: the labels of docs/architecture.md#optimizer, Muon batching and head-flattening against
optax's own Muon, schedules, frozen router bias and weight-decay mask, a real-loss decrease on Config.tiny(),
ZeRO-1 shardings, and updates under Auto and Explicit meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import longcat_jax as lj
from longcat_jax.training import optim

# Constant learning rate, no clipping, no decay: the update is Muon / AdamW alone.
PLAIN = dict(lr=0.05, warmup_steps=0, total_steps=100, min_lr_ratio=1.0, clip_norm=None, weight_decay=0.0)


def _normal(seed, shape):
    # numpy, not jax.random: an eager jax sampler compiles once per shape, which costs seconds here.
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _steps(tx, params, grads_seq):
    """Apply tx for each gradient tree in turn (jitted once); returns the final params."""

    @jax.jit
    def run(params):
        state = tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    return run(params)


def _reference_muon(matrices: dict, grads_seq: list[dict]) -> dict:
    """optax.contrib.muon on plain 2-D matrices (each leaf is its own matrix), with the settings that
    make_optimizer(PLAIN) should reproduce."""
    # Coefficient rows make optax scan the 5 Newton-Schulz steps (as optim does) rather than unroll them: the
    # same arithmetic, a fraction of the compile time.
    tx = optax.contrib.muon(
        PLAIN["lr"], ns_coeffs=((3.4445, -4.7750, 2.0315),) * 5, beta=0.95, nesterov=True, consistent_rms=0.2
    )
    return _steps(tx, matrices, grads_seq)


@pytest.fixture(scope="module")
def tiny():
    cfg = lj.Config.tiny()
    graphdef, params = nnx.split(lj.build_model(cfg, seed=0), nnx.Param)
    return cfg, graphdef, params


def test_labels_of_tiny_model(tiny):
    cfg, _, params = tiny
    labels = optim.param_labels(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)  # usable directly by optax.partition
    flat = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(labels))
    }
    assert set(flat.values()) == set(optim.LABELS)
    expect = {
        "['embed']": "adamw",
        "['lm_head']": "adamw",
        "['mtp']['embed']": "adamw",
        "['ngram']['tables']": "adamw",
        "['final_norm']['weight']": "adamw",
        "['layers']['attn0']['q_norm']": "adamw",
        "['layers']['moe']['classifier']": "adamw",
        "['layers']['indexer0']['weights_proj']": "adamw",
        "['layers']['moe']['bias']": "frozen",
        "['layers']['attn1']['w_o']": "muon",
        "['layers']['attn0']['w_q_up']": "muon",
        "['layers']['indexer0']['wq_b']": "muon",
        "['layers']['indexer0']['wk']": "muon",
        "['layers']['moe']['w_down']": "muon",
        "['layers']['mlp1']['w_gate']": "muon",
        "['ngram']['proj']": "muon",
        "['mtp']['w_eh']": "muon",
        "['mtp']['attn']['w_kv_down']": "muon",
    }
    assert {k: flat[k] for k in expect} == expect
    # Every norm weight is AdamW without weight decay; every Muon matrix decays.
    decay = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(optim.weight_decay_mask(params)))
    }
    assert all(not decay[k] for k in flat if "norm" in k)
    assert all(decay[k] for k, v in flat.items() if v == "muon")
    # The abstract model (ShapeDtypeStruct leaves, what a trainer holds before init or restore) labels alike.
    abstract = nnx.split(lj.abstract_model(cfg), nnx.Param)[1]
    assert nnx.to_pure_dict(optim.param_labels(abstract)) == nnx.to_pure_dict(labels)


def test_unknown_or_misshapen_parameter_raises():
    with pytest.raises(ValueError, match="w_new"):
        optim.param_labels({"layers": {"attn0": {"w_new": jnp.zeros((2, 4, 4))}}})
    with pytest.raises(ValueError, match="rank 3"):  # a stacked MLP matrix without its layers axis
        optim.make_optimizer(optim.OptimizerSettings(), {"layers": {"mlp0": {"w_up": jnp.zeros((4, 8))}}})


def test_stacked_and_head_stacked_matrices_match_2d_muon():
    """Stacked layers / experts are batch axes and head-stacked weights are one 2-D matrix: the result equals
    optax's Muon run on every logical [m, n] matrix on its own."""
    L, E = 2, 3
    params = {
        "layers": {
            "mlp0": {"w_up": _normal(0, (L, 8, 12))},
            "moe": {"w_down": _normal(1, (L, E, 12, 8))},
            "attn0": {"w_o": _normal(2, (L, 4, 3, 8)), "w_q_up": _normal(3, (L, 6, 4, 5))},
        }
    }
    # Each logical matrix: (path, index of its leading batch axes, its 2-D shape).
    matrices = [(("mlp0", "w_up"), (l,), (8, 12)) for l in range(L)]
    matrices += [(("moe", "w_down"), (l, e), (12, 8)) for l in range(L) for e in range(E)]
    matrices += [(("attn0", "w_o"), (l,), (12, 8)) for l in range(L)]  # [N, Hv, D] as [N*Hv, D]
    matrices += [(("attn0", "w_q_up"), (l,), (6, 20)) for l in range(L)]  # [Rq, N, H] as [Rq, N*H]

    def flat(tree):
        return {f"{m}/{i}": tree["layers"][m[0]][m[1]][i].reshape(shape) for m, i, shape in matrices}

    grads_seq = [jax.tree.map(lambda x, s=s: _normal(s, x.shape), params) for s in (10, 11)]
    got = _steps(optim.make_optimizer(optim.OptimizerSettings(**PLAIN), params), params, grads_seq)
    want = _reference_muon(flat(params), [flat(g) for g in grads_seq])
    got = flat(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_schedules_at_key_steps():
    cos = optim.learning_rate_schedule(
        optim.OptimizerSettings(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    )
    for step, want in [(0, 1 / 11), (9, 10 / 11), (10, 1.0), (60, 0.55), (110, 0.1), (500, 0.1)]:
        np.testing.assert_allclose(cos(step), want, rtol=1e-6, err_msg=f"cosine step {step}")
    np.testing.assert_allclose(
        jax.jit(cos)(jnp.int32(35)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-6
    )
    wsd = optim.learning_rate_schedule(
        optim.OptimizerSettings(
            lr=1.0, warmup_steps=10, total_steps=100, schedule="wsd", wsd_decay_fraction=0.2, min_lr_ratio=0.1
        )
    )
    for step, want in [(0, 1 / 11), (10, 1.0), (79, 1.0), (80, 1.0), (90, 0.55), (100, 0.1), (200, 0.1)]:
        np.testing.assert_allclose(wsd(step), want, rtol=1e-6, err_msg=f"wsd step {step}")
    with pytest.raises(ValueError, match="schedule"):
        optim.OptimizerSettings(schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.OptimizerSettings(warmup_steps=100, total_steps=100)
    with pytest.raises(ValueError, match="overlaps"):
        optim.OptimizerSettings(warmup_steps=90, total_steps=100, schedule="wsd", wsd_decay_fraction=0.2)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _moe_tree():
    return {
        "embed": _normal(0, (16, 8)),
        "layers": {
            "moe": {
                "bias": _normal(1, (2, 4)),
                "classifier": _normal(2, (2, 8, 4)),
                "w_up": _normal(3, (2, 3, 8, 4)),
            },
            "norm_in0": {"weight": 1 + _normal(4, (2, 8))},
        },
    }


def test_frozen_bias_unchanged_and_decay_mask():
    params = _moe_tree()
    settings = optim.OptimizerSettings(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5)
    tx = optim.make_optimizer(settings, params)
    # Non-zero gradients everywhere, the bias included: only the bias must stay put, bit for bit.
    grads = jax.tree.map(lambda x: _normal(7, x.shape), params)
    new = _steps(tx, params, [grads, grads])
    np.testing.assert_array_equal(new["layers"]["moe"]["bias"], params["layers"]["moe"]["bias"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
        if "bias" not in jax.tree_util.keystr(path):
            assert np.all(np.asarray(a) != np.asarray(b)), jax.tree_util.keystr(path)
    # Zero gradients leave only decoupled decay: matrices shrink by (1 - lr * wd), norm weights do not move.
    new = _steps(tx, params, [jax.tree.map(jnp.zeros_like, params)])
    for path in (("embed",), ("layers", "moe", "classifier"), ("layers", "moe", "w_up")):
        np.testing.assert_allclose(
            _get(new, path), _get(params, path) * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=str(path)
        )
    np.testing.assert_array_equal(new["layers"]["norm_in0"]["weight"], params["layers"]["norm_in0"]["weight"])


def test_few_steps_decrease_tiny_model_loss(tiny):
    cfg, graphdef, params = tiny
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 17)))
    tx = optim.make_optimizer(optim.OptimizerSettings(lr=1e-2, warmup_steps=1, total_steps=20), params)

    def loss_fn(p):
        logits = lj.forward(nnx.merge(graphdef, p), tokens[:, :-1], with_mtp=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    p, state, losses = params, tx.init(params), []
    for _ in range(5):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    np.testing.assert_array_equal(p["layers"]["moe"]["bias"][...], params["layers"]["moe"]["bias"][...])
    assert not np.allclose(p["layers"]["moe"]["w_up"][...], params["layers"]["moe"]["w_up"][...])


def test_zero1_shardings():
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    leaves = {
        "a": jax.ShapeDtypeStruct((2, 8, 6), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "tp"))),
        "b": jax.ShapeDtypeStruct((3, 8), jnp.float32, sharding=NamedSharding(mesh, P("tp"))),
        "c": jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=NamedSharding(mesh, P("dp"))),
        "d": jnp.zeros((3, 5)),
        "count": jnp.zeros((), jnp.int32),
    }
    specs = jax.tree.map(lambda s: s.spec, optim.zero1_state_shardings(leaves, mesh))
    assert specs == {
        "a": P("dp", None, "tp"),
        "b": P("tp", "dp"),
        "c": P("dp", None),
        "d": P(None, None),
        "count": P(),
    }
    with pytest.raises(ValueError, match="'dp'"):
        optim.zero1_state_shardings(leaves, jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4]))


# Contracting dims sharded over tp: this is what makes optax's Newton-Schulz fail under an Explicit mesh.
_SPECS = {
    "embed": P("tp", None),
    "layers": {
        "attn0": {"w_o": P(None, "tp", None, None)},
        "mlp0": {"w_up": P(None, "tp", None)},
        "moe": {"bias": P(), "classifier": P(None, None, "tp"), "w_up": P(None, None, "tp", None)},
        "norm_in0": {"weight": P()},
    },
}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_zero1_update_matches_single_device(axis_type):
    params = _moe_tree()
    params["layers"]["attn0"] = {"w_o": _normal(5, (2, 4, 2, 8))}
    params["layers"]["mlp0"] = {"w_up": _normal(6, (2, 8, 12))}
    grads_seq = [jax.tree.map(lambda x, s=s: _normal(s, x.shape), params) for s in (10, 11)]
    tx = optim.make_optimizer(optim.OptimizerSettings(lr=0.1, warmup_steps=0, total_steps=10), params)

    def two_steps(p, state):
        for grads in grads_seq:
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    want = jax.jit(two_steps)(params, tx.init(params))[0]

    mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), _SPECS)
        p = jax.device_put(params, p_shard)
        state = jax.jit(tx.init)(p)
        s_shard = optim.zero1_state_shardings(state, mesh)
        assert any("dp" in s.spec for s in jax.tree.leaves(s_shard))
        state = jax.device_put(state, s_shard)
        got, new_state = jax.jit(two_steps, out_shardings=(p_shard, s_shard))(p, state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(s_shard)):
        assert a.sharding.is_equivalent_to(b, a.ndim)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
