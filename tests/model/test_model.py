"""Whole-model invariances on Config.tiny() (every feature on):
decode cache, MTP, sparse-vs-dense, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
from longcat_jax.model.block import Context
from longcat_jax.model.layers import config_inv_freq, expert_swiglu, swiglu
from longcat_jax.model.mla import attend_absorbed, attend_naive
from longcat_jax.ops.masks import attention_mask
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def tiny():
    cfg = lj.Config.tiny()
    return cfg, lj.build_model(cfg, seed=0)


def _tokens(cfg, batch, length, seed=0):
    ids = np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, length))
    ids[0, length // 3] = cfg.eos_token_id  # exercises the N-gram history reset
    return jnp.asarray(ids)


def _with_params_of(model, cfg):
    """A model of config `cfg` that takes every parameter it shares with `model`."""
    other = lj.build_model(cfg, seed=1)
    src = nnx.to_pure_dict(nnx.state(model))
    dst = nnx.to_pure_dict(nnx.state(other))

    def copy(d, s):
        for k in d:
            d[k] = copy(d[k], s[k]) if isinstance(d[k], dict) else s[k]
        return d

    copy(dst, src)
    nnx.update(other, dst)
    return other


def test_forward_shapes_and_finite(tiny):
    cfg, model = tiny
    out = jax.jit(lj.forward)(model, _tokens(cfg, 2, 40))
    assert out.logits.shape == (2, 40, cfg.vocab_size)
    assert out.mtp_logits.shape == (cfg.mtp_num_steps, 2, 40, cfg.vocab_size)
    assert bool(jnp.isfinite(out.logits).all() & jnp.isfinite(out.mtp_logits).all())


def test_prefill_then_decode_equals_forward(tiny):
    """Long enough (40 > hi_min_len 24 > index_topk 16) that SI, CLI and HI all shape the selection."""
    cfg, model = tiny
    tokens = _tokens(cfg, 2, 40, seed=3)
    full = jax.jit(lj.forward)(model, tokens).logits
    logits, cache = jax.jit(lj.prefill, static_argnums=2)(model, tokens[:, :30], 48)
    assert rel_err(logits, full[:, :30]) < 1e-5
    step = jax.jit(lj.decode_step)
    for t in range(30, 36):
        logits, cache = step(model, tokens[:, t : t + 1], cache)
        assert rel_err(logits[:, 0], full[:, t]) < 1e-5
    logits, cache = step(model, tokens[:, 36:40], cache)  # a multi-token extend
    assert rel_err(logits, full[:, 36:40]) < 1e-5
    assert int(cache.length) == 40


def test_prefill_rejects_prompt_longer_than_cache(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match="does not fit"):
        lj.prefill(model, _tokens(cfg, 1, 10), 8)


def test_mtp_off_leaves_main_logits_unchanged(tiny):
    cfg, model = tiny
    tokens = _tokens(cfg, 2, 20)
    no_mtp = _with_params_of(model, cfg.replace(mtp_num_steps=0))
    assert no_mtp.mtp is None
    np.testing.assert_array_equal(lj.forward(model, tokens).logits, lj.forward(no_mtp, tokens).logits)


def test_mtp_steps_share_one_block(tiny):
    cfg, model = tiny
    sizes = [x.size for x in jax.tree.leaves(nnx.state(model.mtp))]
    one_block = [x.size for x in jax.tree.leaves(nnx.state(lj.build_model(cfg.replace(mtp_num_steps=1)).mtp))]
    assert sum(sizes) == sum(one_block)
    out = lj.forward(model, _tokens(cfg, 1, 12))
    assert not np.allclose(out.mtp_logits[0], out.mtp_logits[1])


def test_sparse_with_k_at_least_T_is_dense(tiny):
    """With index_topk >= T (and HI off) LSA selects every causal key: identical to dense MLA."""
    cfg, model = tiny
    tokens = _tokens(cfg, 2, 20)
    sparse = _with_params_of(model, cfg.replace(index_topk=32, hi_enabled=False))
    dense = _with_params_of(model, cfg.replace(use_indexer=False, si_enabled=False, hi_enabled=False))
    np.testing.assert_allclose(lj.forward(sparse, tokens).logits, lj.forward(dense, tokens).logits, atol=1e-6)


def test_sparse_selection_changes_long_outputs(tiny):
    """Past index_topk the selection is real: the sparse model differs from the dense one there."""
    cfg, model = tiny
    tokens = _tokens(cfg, 1, 40)
    dense = _with_params_of(model, cfg.replace(use_indexer=False, si_enabled=False, hi_enabled=False))
    a, b = lj.forward(model, tokens).logits, lj.forward(dense, tokens).logits
    np.testing.assert_allclose(a[:, : cfg.index_topk], b[:, : cfg.index_topk], atol=1e-6)
    assert not np.allclose(a[:, cfg.index_topk + 4 :], b[:, cfg.index_topk + 4 :], atol=1e-4)


def test_absorbed_equals_naive():
    cfg = lj.Config.tiny()
    keys = jax.random.split(jax.random.key(0), 5)
    B, T, N = 2, 11, cfg.num_heads
    q_nope = jax.random.normal(keys[0], (B, T, N, cfg.qk_nope_head_dim))
    q_rope = jax.random.normal(keys[1], (B, T, N, cfg.qk_rope_head_dim))
    c_kv = jax.random.normal(keys[2], (B, T, cfg.kv_lora_rank))
    k_rope = jax.random.normal(keys[3], (B, T, cfg.qk_rope_head_dim))
    w = jax.random.normal(keys[4], (cfg.kv_lora_rank, N, cfg.qk_nope_head_dim + cfg.v_head_dim)) * 0.3
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(pos, pos)
    o_abs, p_abs = attend_absorbed(q_nope, q_rope, c_kv, k_rope, w, mask, cfg)
    o_naive, p_naive = attend_naive(q_nope, q_rope, c_kv, k_rope, w, mask, cfg)
    assert rel_err(o_abs, o_naive) < 1e-5 and rel_err(p_abs, p_naive) < 1e-5
    np.testing.assert_allclose(p_naive.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_backward_equals_autodiff(dtype):
    """The hand-written SwiGLU backward against JAX's derivative of the plain formula (weights in f32, the
    activation in `dtype`, as a bf16 compute dtype runs it)."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 3, 16), dtype)
    w_gate, w_up = (jax.random.normal(k, (16, 40)) * 0.3 for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (40, 16)) * 0.3
    dy = jax.random.normal(keys[4], (2, 3, 16), dtype)

    def plain(x, w_gate, w_up, w_down):
        g, u = x @ w_gate.astype(x.dtype), x @ w_up.astype(x.dtype)
        return (jax.nn.silu(g) * u) @ w_down.astype(x.dtype)

    tol = 1e-6 if dtype == jnp.float32 else 2e-2

    def check(fn, reference, args, dy):
        y_ref, vjp_ref = jax.vjp(reference, *args)
        y, vjp = jax.vjp(fn, *args)
        assert y.dtype == dtype and rel_err(y, y_ref) < tol
        for got, want, arg in zip(vjp(dy), vjp_ref(dy), args):
            assert got.dtype == arg.dtype and got.shape == arg.shape
            assert rel_err(got, want) < tol

    # Alone, and under the remat policies train.py offers
    # (what they save decides what the backward recomputes).
    for policy in (None, jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.nothing_saveable):
        check(swiglu if policy is None else jax.checkpoint(swiglu, policy=policy), plain,
              (x, w_gate, w_up, w_down), dy)
    # Per expert (the capacity-factor MoE): each expert's slice equals the plain formula with its own weights.
    stacked = [jnp.stack([w, -w[::-1]]) for w in (w_gate, w_up, w_down)]
    check(expert_swiglu, jax.vmap(plain), (x[:2].reshape(2, 3, 16), *stacked), dy[:2].reshape(2, 3, 16))


def test_backward_runs_and_reaches_every_parameter(tiny):
    cfg, model = tiny
    tokens = _tokens(cfg, 2, 32)
    graphdef, params = nnx.split(model)

    def loss(params):
        out = lj.forward(nnx.merge(graphdef, params), tokens)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        mtp = jax.nn.log_softmax(out.mtp_logits).mean()
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() - 0.1 * mtp

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    flat = nnx.to_flat_state(grads)
    no_grad = {".".join(map(str, p)) for p, v in flat if not np.any(np.asarray(v.get_value()))}
    # The router bias only steers selection and the indexer learns from its own KL loss (training issue).
    allowed = {p for p in no_grad if p.endswith("moe.bias") or "indexer" in p}
    assert no_grad == allowed, sorted(no_grad - allowed)
    assert all(np.isfinite(np.asarray(v.get_value())).all() for _, v in flat)


def test_build_on_mesh_shards_params_and_matches():
    cfg = lj.Config.tiny()
    from sharding.mesh import make_mesh

    mesh = make_mesh({"ep": 2, "tp": 2, "vp": 2})
    sharded = lj.build_model(cfg, seed=0, mesh=mesh)
    spec = sharded.layers.moe.w_gate[...].sharding.spec
    assert spec[0] is None or spec[0] == "pp"  # the stacked `layers` axis
    assert spec[1] == "ep" and spec[3] == "tp"
    assert sharded.ngram.tables[...].sharding.spec[0] == "vp"
    assert nnx.get_partition_spec(nnx.state(sharded.layers))["attn0"]["w_o"].get_value()[0] == "layers"
    tokens = _tokens(cfg, 2, 16)
    with jax.set_mesh(mesh):
        got = jax.jit(lj.forward)(sharded, tokens).logits
    plain = lj.build_model(cfg, seed=0)
    assert rel_err(got, lj.forward(plain, tokens).logits) < 1e-5
    # 6 experts cannot be split 4 ways: an error before anything is built, not experts on every device.
    with pytest.raises(ValueError, match=r"\(logical 'experts', size 6\) is not divisible by mesh axis 'ep'"):
        lj.build_model(cfg, seed=0, mesh=make_mesh({"ep": 4, "dp": 2}))


def test_context_positions_offset_matches_cache_path(tiny):
    """forward with explicit positions is what decode uses internally; positions must drive RoPE."""
    cfg, model = tiny
    tokens = _tokens(cfg, 1, 8)
    a = lj.forward(model, tokens).logits
    b = lj.forward(model, tokens, positions=jnp.arange(8)[None] + 5).logits
    assert not np.allclose(a, b)
    assert Context(positions=jnp.zeros((1, 1), jnp.int32), inv_freq=config_inv_freq(cfg)).cache_len is None
