"""Router with zero experts and the MoE dispatch paths (docs/architecture.md#router)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.moe import MoE, capacity, expert_load, moe_capacity, moe_dropless, route
from tests.helpers import rel_err

CFG = Config.tiny()  # D 64, Fe 32, 6 routed + 2 zero experts, top-3, rsf 2.0


def random_params(cfg, seed, classifier_std=0.3, bias_std=0.05):
    """Router and expert weights with a spread of router logits large enough that no top-k scores tie."""
    r = np.random.default_rng(seed)
    D, S, E, F = cfg.hidden_size, cfg.num_slots, cfg.n_routed_experts, cfg.expert_ffn_hidden_size
    return {
        "classifier": r.normal(0, classifier_std, (D, S)).astype(np.float32),
        "bias": r.normal(0, bias_std, (S,)).astype(np.float32),
        "w_gate": r.normal(0, 0.1, (E, D, F)).astype(np.float32),
        "w_up": r.normal(0, 0.1, (E, D, F)).astype(np.float32),
        "w_down": r.normal(0, 0.1, (E, F, D)).astype(np.float32),
    }


def tokens(n, d, seed):
    return np.random.default_rng(seed + 100).normal(0, 1, (n, d)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "dispatch"))
def run_moe(x, p, cfg, dispatch=moe_dropless):
    """Route then dispatch, jitted: (out [N, D], weights [N, K], indices [N, K])."""
    w, idx, _ = route(x, p["classifier"], p["bias"], cfg)
    return dispatch(x, w, idx, p["w_gate"], p["w_up"], p["w_down"], cfg), w, idx


def numpy_moe(x, w, idx, p, cfg, cap=None):
    """Explicit per-token loop; with `cap`, assignments past an expert's capacity (token order) drop."""
    E = cfg.n_routed_experts
    out = np.zeros_like(x, dtype=np.float64)
    seen = np.zeros(E, int)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e, g = int(idx[t, j]), float(w[t, j])
            if e >= E:
                out[t] += g * x[t]
                continue
            seen[e] += 1
            if cap is not None and seen[e] > cap:
                continue
            h = x[t] @ p["w_gate"][e]
            h = h / (1 + np.exp(-h)) * (x[t] @ p["w_up"][e])
            out[t] += g * (h @ p["w_down"][e])
    return out


# --- HF parity ----------------------------------------------------------------------------------------------


def hf_moe(cfg, p):
    torch = pytest.importorskip("torch", reason="torch not installed: HF parity needs the test extra")
    mod = pytest.importorskip("transformers.models.longcat_flash.modeling_longcat_flash")
    from transformers import LongcatFlashConfig

    hf_cfg = LongcatFlashConfig(
        vocab_size=64,
        hidden_size=cfg.hidden_size,
        num_layers=1,
        n_routed_experts=cfg.n_routed_experts,
        zero_expert_num=cfg.zero_expert_num,
        moe_topk=cfg.moe_topk,
        expert_ffn_hidden_size=cfg.expert_ffn_hidden_size,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )
    m = mod.LongcatFlashMoE(hf_cfg).float().eval()
    E = cfg.n_routed_experts
    # HF layouts: classifier [slots, D]; gate_up_proj [E, 2F, D] (gate rows first; transformers 5.24 had a row
    # per slot, rows >= E unused); down_proj [E, D, F].
    gate_up = np.zeros(tuple(m.experts.gate_up_proj.shape), np.float32)
    gate_up[:E] = np.concatenate([p["w_gate"].transpose(0, 2, 1), p["w_up"].transpose(0, 2, 1)], axis=1)
    with torch.no_grad():
        m.router.classifier.weight.copy_(torch.from_numpy(p["classifier"].T.copy()))
        m.router.e_score_correction_bias.copy_(torch.from_numpy(p["bias"]))
        m.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        m.experts.down_proj.copy_(torch.from_numpy(p["w_down"].transpose(0, 2, 1).copy()))
    return torch, m


@pytest.mark.parametrize("seed", [0, 1])
def test_route_matches_hf_router(seed):
    p = random_params(CFG, seed)
    assert np.abs(p["bias"]).max() > 0
    torch, m = hf_moe(CFG, p)
    x = tokens(32, CFG.hidden_size, seed)
    with torch.no_grad():
        _, hf_w, hf_idx = m.router(torch.from_numpy(x))
    w, idx, probs = route(jnp.asarray(x), p["classifier"], p["bias"], CFG)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    # HF uses topk(sorted=False): compare index sets, and weights after ordering both by slot id.
    hf_idx, hf_w = hf_idx.numpy(), hf_w.numpy()
    o_hf, o = np.argsort(hf_idx, axis=1), np.argsort(np.asarray(idx), axis=1)
    idx_sorted = np.take_along_axis(np.asarray(idx), o, 1)
    np.testing.assert_array_equal(idx_sorted, np.take_along_axis(hf_idx, o_hf, 1))
    # f32 on both sides, but torch and XLA sum the D-long logit dots in different orders: a few ulps apart.
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(w), o, 1), np.take_along_axis(hf_w, o_hf, 1), rtol=1e-5, atol=1e-7
    )


def test_route_bias_changes_selection_not_weights():
    p = random_params(CFG, 3)
    x = jnp.asarray(tokens(16, CFG.hidden_size, 3))
    big = np.zeros(CFG.num_slots, np.float32)
    big[[1, 4, 7]] = 10.0  # forces slots {1, 4, 7}, including identity slot 7
    w, idx, probs = route(x, p["classifier"], big, CFG)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.tile([1, 4, 7], (16, 1)))
    np.testing.assert_allclose(w, np.take_along_axis(np.asarray(probs), np.asarray(idx), 1) * 2.0, rtol=1e-6)
    assert float(w.sum(1).max()) < CFG.routed_scaling_factor  # no renormalisation


def test_route_tie_break_lowest_slot():
    cfg = CFG.replace(moe_topk=2)
    x = jnp.zeros((2, cfg.hidden_size))  # uniform probs: every slot ties
    _, idx, _ = route(x, jnp.zeros((cfg.hidden_size, cfg.num_slots)), jnp.zeros(cfg.num_slots), cfg)
    np.testing.assert_array_equal(idx, [[0, 1], [0, 1]])
    bias = jnp.zeros(cfg.num_slots).at[jnp.array([3, 5, 6])].set(1.0)
    _, idx, _ = route(x, jnp.zeros((cfg.hidden_size, cfg.num_slots)), bias, cfg)
    np.testing.assert_array_equal(idx, [[3, 5], [3, 5]])


@pytest.mark.parametrize("seed", [0, 1])
def test_moe_module_matches_hf(seed):
    p = random_params(CFG, seed)
    torch, m = hf_moe(CFG, p)
    x = tokens(2 * 24, CFG.hidden_size, seed).reshape(2, 24, CFG.hidden_size)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    with nnx.use_eager_sharding(False):
        model = MoE(CFG, nnx.Rngs(seed))
    for name, v in p.items():
        getattr(model, name)[...] = jnp.asarray(v)
    out = model(jnp.asarray(x))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= 1e-5
    _, idx, _ = model.route_tokens(jnp.asarray(x))
    n_identity = int((np.asarray(idx) >= CFG.n_routed_experts).sum())
    assert 0 < n_identity < idx.size  # both expert kinds are exercised


def test_module_params():
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    with nnx.use_eager_sharding(False):
        model = MoE(cfg, nnx.Rngs(0))
    D, S, E, F = cfg.hidden_size, cfg.num_slots, cfg.n_routed_experts, cfg.expert_ffn_hidden_size
    want = {
        "classifier": ((D, S), ("embed", "slots"), jnp.float32),
        "bias": ((S,), ("slots",), jnp.float32),
        "w_gate": ((E, D, F), ("experts", "embed", "expert_mlp"), jnp.bfloat16),
        "w_up": ((E, D, F), ("experts", "embed", "expert_mlp"), jnp.bfloat16),
        "w_down": ((E, F, D), ("experts", "expert_mlp", "embed"), jnp.bfloat16),
    }
    params = nnx.state(model, nnx.Param)
    assert set(params.keys()) == set(want)
    for name, (shape, names, dtype) in want.items():
        var = getattr(model, name)
        assert var.shape == shape and var.dtype == dtype and tuple(var.out_sharding) == names, name
    assert not np.any(np.asarray(model.bias[...]))
    u = jax.random.normal(jax.random.key(0), (2, 5, D), jnp.bfloat16)
    out = model(u)
    assert out.shape == u.shape and out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


# --- Identity experts and scaling ---------------------------------------------------------------------------


def test_identity_experts_return_input_scaled():
    p = random_params(CFG, 4)
    x = jnp.asarray(tokens(10, CFG.hidden_size, 4))
    cfg = CFG.replace(moe_topk=2)
    bias = np.zeros(cfg.num_slots, np.float32)
    bias[cfg.n_routed_experts :] = 10.0  # forces the two zero experts
    out, w, idx = run_moe(x, p | {"bias": bias}, cfg)
    assert np.all(np.asarray(idx) >= cfg.n_routed_experts)
    np.testing.assert_allclose(out, np.asarray(w).sum(1, keepdims=True) * np.asarray(x), rtol=1e-6)
    _, _, probs = route(x, p["classifier"], bias, cfg)
    # rsf multiplies the identity-expert weights too (HF convention, docs/architecture.md#router).
    np.testing.assert_allclose(
        np.sort(w, 1), np.sort(np.asarray(probs)[:, cfg.n_routed_experts :] * 2.0, 1), rtol=1e-6
    )


@pytest.mark.parametrize("n_tokens", [40, 2], ids=["tiles", "few-tokens-gather"])
def test_dropless_matches_numpy_loop(n_tokens):
    """Many tokens go through the expert tiles; 2 tokens x top-3 = 6 assignments <= 6 experts through the
    gather of the chosen experts' weights (the decode path)."""
    p = random_params(CFG, 5)
    x = tokens(n_tokens, CFG.hidden_size, 5)
    out, w, idx = run_moe(jnp.asarray(x), p, CFG)
    ref = numpy_moe(x, np.asarray(w), np.asarray(idx), p, CFG)
    assert rel_err(out, ref) <= 1e-5


def test_ragged_dot_zero_fills_rows_outside_groups():
    lhs = jnp.ones((6, 4))
    out = jax.lax.ragged_dot(lhs, jnp.ones((2, 4, 3)), jnp.array([2, 1], jnp.int32))
    np.testing.assert_array_equal(out[3:], 0.0)
    np.testing.assert_array_equal(out[:3], 4.0)


# --- Capacity path ------------------------------------------------------------------------------------------


def test_capacity_huge_equals_dropless():
    p = random_params(CFG, 6)
    x = jnp.asarray(tokens(24, CFG.hidden_size, 6))
    cfg = CFG.replace(capacity_factor=100.0)
    assert capacity(cfg, 24, CFG.n_routed_experts) == 24
    dropless, _, _ = run_moe(x, p, CFG)
    capped, _, _ = run_moe(x, p, cfg, moe_capacity)
    assert rel_err(capped, dropless) <= 1e-6


@pytest.mark.parametrize("cf", [0.3, 0.75])
def test_capacity_drops_over_capacity_assignments(cf):
    p = random_params(CFG, 7)
    n = 30
    x = tokens(n, CFG.hidden_size, 7)
    cfg = CFG.replace(capacity_factor=cf)
    cap = math.ceil(cf * n * CFG.moe_topk / CFG.n_routed_experts)
    assert capacity(cfg, n, CFG.n_routed_experts) == cap
    out, w, idx = run_moe(jnp.asarray(x), p, cfg, moe_capacity)
    idx_np = np.asarray(idx)
    counts = np.bincount(idx_np[idx_np < CFG.n_routed_experts], minlength=CFG.n_routed_experts)
    assert counts.max() > cap  # something is actually dropped
    ref = numpy_moe(x, np.asarray(w), idx_np, p, CFG, cap=cap)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, numpy_moe(x, np.asarray(w), idx_np, p, CFG)) > 1e-2


# --- Determinism, permutation, gradients, load --------------------------------------------------------------


@pytest.mark.parametrize("cf", [None, 1.0])
def test_deterministic_across_jit_calls(cf):
    p = random_params(CFG, 8)
    cfg = CFG.replace(capacity_factor=cf)
    dispatch = moe_dropless if cf is None else moe_capacity
    f = jax.jit(lambda x: run_moe(x, p, cfg, dispatch)[0])
    x = jnp.asarray(tokens(48, CFG.hidden_size, 8))
    a, b = f(x), jax.jit(lambda x: run_moe(x, p, cfg, dispatch)[0])(x)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, f(x))


def test_token_permutation_permutes_output():
    p = random_params(CFG, 9)
    x = tokens(48, CFG.hidden_size, 9)
    perm = np.random.default_rng(9).permutation(48)
    f = jax.jit(lambda x: run_moe(x, p, CFG)[0])
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x)))[perm], f(jnp.asarray(x[perm])))


@pytest.mark.parametrize("cf", [None, 0.5])
def test_gradients_flow(cf):
    p = {k: jnp.asarray(v) for k, v in random_params(CFG, 10).items()}
    cfg = CFG.replace(capacity_factor=cf)
    dispatch = moe_dropless if cf is None else moe_capacity
    x = jnp.asarray(tokens(20, CFG.hidden_size, 10))

    def loss(p, x):
        return jnp.sum(jnp.sin(run_moe(x, p, cfg, dispatch)[0]))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
    for name in ("classifier", "w_gate", "w_up", "w_down"):
        assert bool(jnp.all(jnp.isfinite(gp[name]))) and float(jnp.abs(gp[name]).max()) > 0, name
    assert float(jnp.abs(gp["bias"]).max()) == 0.0  # selection only
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0


def test_gradients_match_hf_autograd():
    """Gradients of sum(sin(MoE(x))) wrt x, router and experts vs torch autograd through LongcatFlashMoE."""
    p = random_params(CFG, 11)
    torch, m = hf_moe(CFG, p)
    x = tokens(24, CFG.hidden_size, 11)
    xt = torch.from_numpy(x).requires_grad_(True)
    torch.sin(m(xt)).sum().backward()
    pj = {k: jnp.asarray(v) for k, v in p.items()}

    def loss(p, x):
        return jnp.sum(jnp.sin(run_moe(x, p, CFG)[0]))

    gp, gx = jax.grad(loss, argnums=(0, 1))(pj, jnp.asarray(x))
    E, F = CFG.n_routed_experts, CFG.expert_ffn_hidden_size
    gate_up = m.experts.gate_up_proj.grad.numpy()[:E]
    assert rel_err(gx, xt.grad.numpy()) <= 1e-5
    assert rel_err(gp["classifier"], m.router.classifier.weight.grad.numpy().T) <= 1e-5
    assert rel_err(gp["w_gate"], gate_up[:, :F].transpose(0, 2, 1)) <= 1e-5
    assert rel_err(gp["w_up"], gate_up[:, F:].transpose(0, 2, 1)) <= 1e-5
    assert rel_err(gp["w_down"], m.experts.down_proj.grad.numpy().transpose(0, 2, 1)) <= 1e-5


def test_expert_load_counts():
    idx = jnp.array([[0, 7, 3], [3, 1, 7]], jnp.int32)
    np.testing.assert_array_equal(expert_load(idx, CFG), [1, 1, 0, 2, 0, 0, 0, 2])
    # The second token is padding: its assignments count nowhere.
    np.testing.assert_array_equal(expert_load(idx, CFG, jnp.array([True, False])), [1, 0, 0, 1, 0, 0, 0, 1])


@pytest.mark.parametrize("routing", ["random", "one_expert", "identity_only"])
def test_tiled_grouped_ffn_equals_ragged_dot(routing):
    """The CPU path (a loop over expert row tiles, hand-written backward) computes exactly what ragged_dot's
    grouped matmul does, gradients included: random groups (some empty, some identity rows), every row on one
    expert (full tiles then a partial one), and no routed row at all (zero tiles)."""
    from longcat_jax.model.expert_tiles import tiled_expert_ffn
    from longcat_jax.model.moe import _sort_assignments

    E, D, F, N, K = 5, 8, 12, 37, 3
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (N, D))
    idx = {"random": jax.random.randint(keys[1], (N, K), 0, E + 2),  # some identity slots (>= E)
           "one_expert": jnp.full((N, K), 3, jnp.int32),
           "identity_only": jnp.full((N, K), E, jnp.int32)}[routing]
    wg, wu = jax.random.normal(keys[2], (E, D, F)), jax.random.normal(keys[3], (E, D, F))
    wd = jax.random.normal(keys[4], (E, F, D))
    order, sorted_e, starts = _sort_assignments(idx, E)
    xs = jnp.repeat(x, K, axis=0)[order]  # identity rows (past starts[E]) hold data too: they must come out 0
    sizes = starts[1:] - starts[:-1]
    cotangent = jax.random.normal(keys[0], xs.shape)

    def ragged(xs, wg, wu, wd):
        h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
        return jnp.where((sorted_e < E)[:, None], jax.lax.ragged_dot(h, wd, sizes), 0)

    for tile in (4, 64):
        tiled = jax.jit(lambda *a, tile=tile: tiled_expert_ffn(a[0], starts, *a[1:], tile=tile))
        got = tiled(xs, wg, wu, wd)
        np.testing.assert_allclose(got, ragged(xs, wg, wu, wd), rtol=1e-5, atol=1e-5)
        grads = jax.grad(lambda *a, f=tiled: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2, 3))(xs, wg, wu, wd)
        expected = jax.grad(lambda *a: jnp.sum(ragged(*a) * cotangent), argnums=(0, 1, 2, 3))(xs, wg, wu, wd)
        for a, b in zip(grads, expected):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
