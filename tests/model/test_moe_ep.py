"""Expert parallelism: the MoE dispatch by all-to-all under shard_map equals the one-device dispatch,
gradients included (docs/architecture.md#expert-parallelism)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from longcat_jax.config import Config
from longcat_jax.model import expert_parallel
from longcat_jax.model.moe import moe_capacity, moe_dropless, moe_expert_parallel, route
from sharding.mesh import make_mesh
from sharding.rules import RULES, logical_to_spec, override_rules
from tests.helpers import rel_err

# 8 routed experts split 2, 4 or 8 ways; 2 zero experts; top-3. 30 tokens do not divide the token shards, so
# the padding is exercised too.
CFG = Config.tiny().replace(n_routed_experts=8)
N = 30
EXPERT_AXES = {"w_gate": ("experts", "embed", "expert_mlp"), "w_up": ("experts", "embed", "expert_mlp"),
               "w_down": ("experts", "expert_mlp", "embed")}  # as moe.MoE declares them


def _params(seed=0):
    r = np.random.default_rng(seed)
    D, S, E, F = CFG.hidden_size, CFG.num_slots, CFG.n_routed_experts, CFG.expert_ffn_hidden_size
    return {"classifier": r.normal(0, 0.3, (D, S)).astype(np.float32),
            "bias": r.normal(0, 0.05, (S,)).astype(np.float32),
            "w_gate": r.normal(0, 0.1, (E, D, F)).astype(np.float32),
            "w_up": r.normal(0, 0.1, (E, D, F)).astype(np.float32),
            "w_down": r.normal(0, 0.1, (E, F, D)).astype(np.float32)}


P0, X = _params(), np.random.default_rng(1).normal(0, 1, (N, CFG.hidden_size)).astype(np.float32)


def _loss(p, x, cfg, rules):
    """A weighted sum of the MoE output: its gradient reaches the router, the experts and the tokens."""
    w, idx, _ = route(x, p["classifier"], p["bias"], cfg)
    experts = (p["w_gate"], p["w_up"], p["w_down"])
    plan = expert_parallel.ep_plan(rules)
    if plan is None:
        out = (moe_dropless if cfg.capacity_factor is None else moe_capacity)(x, w, idx, *experts, cfg)
    else:
        out = moe_expert_parallel(x, w, idx, *experts, cfg, plan)
    return jnp.sum(out * jnp.cos(jnp.arange(x.shape[1], dtype=jnp.float32)))


def _grad_fn():
    """A fresh jitted (loss, (d params, d x)), so no test reuses a program traced under another exchange."""
    return jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=(2, 3))


def _placed(p, mesh, rules):
    """The expert weights split as the model places them (experts over the expert axes, Fe over tp)."""
    def spec(k):
        return NamedSharding(mesh, logical_to_spec(EXPERT_AXES[k], rules, mesh.axis_names))

    return {k: jax.device_put(v, spec(k)) if k in EXPERT_AXES else v for k, v in p.items()}


def _assert_same(got, ref, tol=1e-5):
    """f32: the experts' matmuls see other row counts per tile, so values agree to rounding, not bits."""
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = dict(jax.tree_util.tree_leaves_with_path(ref))[path]
        assert rel_err(a, b) <= tol, (jax.tree_util.keystr(path), rel_err(a, b))


@pytest.fixture(scope="module")
def dropless_ref():
    return _grad_fn()(P0, X, CFG, RULES)


@pytest.fixture(scope="module")
def dropless_dp_ep_tp():
    """dp=2, ep=2, tp=2: tokens split over dp and ep, experts over ep, Fe over tp (left to XLA). Compiled
    once: the result and the program text."""
    mesh = make_mesh({"dp": 2, "ep": 2, "tp": 2})
    with jax.set_mesh(mesh):
        p = _placed(P0, mesh, RULES)
        compiled = _grad_fn().lower(p, X, CFG, RULES).compile()
        return compiled(p, X), compiled.as_text()


def test_dropless_matches_one_device(dropless_ref, dropless_dp_ep_tp):
    _assert_same(dropless_dp_ep_tp[0], dropless_ref)


def test_tokens_travel_by_all_to_all_and_weights_stay(dropless_dp_ep_tp):
    """Forward: the counts, the rows out and the rows back; backward: the two row exchanges transposed. No
    expert weight is ever gathered ([.., D, Fe] or [.., Fe, D] from an all-gather), and no collective sits in
    the expert tile loop, whose trip count differs between devices (across processes such a collective pairs
    up wrongly)."""
    hlo = dropless_dp_ep_tp[1]
    assert len(re.findall(r" all-to-all\(", hlo)) == 5
    collectives = re.findall(r".* (?:all-to-all|all-gather|all-reduce|collective-permute)\(.*", hlo)
    assert collectives and not [c for c in collectives if "/while/" in c]
    D, F = CFG.hidden_size, CFG.expert_ffn_hidden_size
    gathered = re.findall(r"= (\S+) all-gather\(", hlo)
    assert gathered and not [s for s in gathered if f",{D},{F}]" in s or f",{F},{D}]" in s], gathered


def test_capacity_drops_what_one_device_drops():
    """ep=8, one expert and 4 tokens per device: with capacity factor 1 some expert overflows, and the ranks
    (token order over all devices) drop exactly the one-device assignments."""
    cfg = CFG.replace(capacity_factor=1.0)
    _, idx, _ = route(X, P0["classifier"], P0["bias"], cfg)
    load = np.bincount(np.asarray(idx).ravel(), minlength=cfg.num_slots)[: cfg.n_routed_experts]
    assert load.max() > 12 == -(-N * cfg.moe_topk // cfg.n_routed_experts)  # capacity 12 overflows
    ref = _grad_fn()(P0, X, cfg, RULES)
    mesh = make_mesh({"ep": 8})
    with jax.set_mesh(mesh):
        got = _grad_fn()(_placed(P0, mesh, RULES), X, cfg, RULES)
    _assert_same(got, ref)


def test_fewer_tokens_than_devices():
    """A decode-sized batch: 3 tokens on ep=8 (5 padding tokens, one token per device)."""
    x = X[:3]
    ref = _grad_fn()(P0, x, CFG, RULES)
    mesh = make_mesh({"ep": 8})
    with jax.set_mesh(mesh):
        got = _grad_fn()(_placed(P0, mesh, RULES), x, CFG, RULES)
    _assert_same(got, ref)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """`lax.ragged_all_to_all` as its docstring defines it, from all_gather (XLA:CPU lacks the op): source r
    writes operand_r[input_offsets_r[me] : + send_sizes_r[me]] at output_offsets_r[me] of this device."""
    del recv_sizes  # implied by the senders' send_sizes
    every = [jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)]
    operands, starts, sizes, lands = every
    me = jax.lax.axis_index(axis_name)
    slot = jnp.arange(output.shape[0])
    for r in range(operands.shape[0]):
        j = slot - lands[r, me]
        take = (j >= 0) & (j < sizes[r, me])
        rows = operands[r][jnp.clip(starts[r, me] + j, 0, operand.shape[0] - 1)]
        output = jnp.where(take[:, None], rows, output)
    return output


def test_ragged_exchange_matches_one_device(dropless_ref, monkeypatch):
    """The GPU/TPU exchange (ragged_all_to_all with its offsets), run here through an emulation of the op, on
    experts split over two mesh axes (experts=ep+cp: 4 shards, 2 experts each)."""
    monkeypatch.setattr(expert_parallel, "use_ragged", lambda: True)
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    rules = override_rules("experts=ep+cp")
    mesh = make_mesh({"ep": 2, "cp": 2, "tp": 2})
    with jax.set_mesh(mesh):
        assert expert_parallel.ep_plan(rules).expert_axes == ("ep", "cp")
        got = _grad_fn()(_placed(P0, mesh, rules), X, CFG, rules)
    _assert_same(got, dropless_ref)


def test_ragged_exchange_lowers_to_the_collective(monkeypatch):
    """With the real op the program lowers (its shapes and offsets type-check) to ragged all-to-alls."""
    monkeypatch.setattr(expert_parallel, "use_ragged", lambda: True)
    mesh = make_mesh({"ep": 4, "tp": 2})
    with jax.set_mesh(mesh):
        text = _grad_fn().lower(_placed(P0, mesh, RULES), X, CFG, RULES).as_text()
    assert text.count("ragged_all_to_all") >= 4  # forward out and back, and their transposes


def test_experts_must_split_evenly():
    cfg = CFG.replace(n_routed_experts=6)
    p = _params()
    p = {**p, **{k: v[:6] for k, v in p.items() if k.startswith("w_")}}
    with jax.set_mesh(make_mesh({"ep": 4, "dp": 2})):
        with pytest.raises(ValueError, match="6 experts do not split over ep = 4"):
            jax.eval_shape(lambda: _loss(p, X, cfg, RULES))
