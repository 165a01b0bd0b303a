"""Shortcut-MoE expert layer: router over routed + zero-computation experts, then dispatch
(docs/architecture.md#router).

The router scores all `num_slots = n_routed + zero` slots with an f32 softmax and selects the top k of
`probs + bias` (the aux-loss-free e_score_correction_bias steers selection only). Each pick is weighted by its
unbiased probability times `routed_scaling_factor`, with no renormalisation. Slots >= n_routed are identity
("zero") experts: they return the token itself, and the scaling applies to them too (HF / NPU convention,
docs/architecture.md#router; upstream SGLang GPU differs).

    MoE(u) = sum_{e in idx, e < E} g_e FFN_e(u) + (sum_{e in idx, e >= E} g_e) u

Two dispatch paths (deterministic, docs/architecture.md#determinism: sort-based, fixed-order combine,
no scatter-add):
  * `moe_dropless`: stable sort of the N*K assignments by expert, `jax.lax.ragged_dot` over the E groups
    (on CPU a loop over expert row tiles, `expert_tiles.tiled_expert_ffn`).
  * `moe_capacity`: fixed [E, C, D] buffers, assignments past capacity (token order) dropped.
Both gather the expert outputs back to [N, K, D] and reduce over K, so results do not depend on atomics.
Under a mesh that splits the experts, `moe_expert_parallel` gives the same result (a capacity's drops
included) with each device's rows sent to the devices holding their experts by all-to-all (expert_parallel.py,
docs/architecture.md#expert-parallelism).
Parity reference: `transformers.models.longcat_flash` `LongcatFlashTopkRouter` / `LongcatFlashMoE`
(docs/architecture.md#parity).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model import expert_parallel
from longcat_jax.model.expert_tiles import tiled_expert_ffn
from longcat_jax.model.layers import expert_swiglu, param
from pallas_kernels import cpu_serving
from sharding.rules import RULES

# --- Router ------------------------------------------------------------------------------------------------


def route(u: jax.Array, classifier: jax.Array, bias: jax.Array, cfg: Config):
    """Top-k routing over routed and identity slots (docs/architecture.md#router).

    Args:
      u: [N, D] router input (any dtype; upcast to f32).
      classifier: [D, slots] router weight (kept in f32).
      bias: [slots] e_score_correction_bias, used for selection only.
    Returns:
      weights [N, K] f32 (= probs[idx] * routed_scaling_factor),
      indices [N, K] int32 (ordered by biased score, ties to the lowest slot),
      probs [N, slots] f32 (softmax over all slots, for load statistics).
    """
    # HIGHEST keeps the logits true f32 on accelerators whose default f32 matmul is TF32/bf16-pass.
    u32, w32 = u.astype(jnp.float32), classifier.astype(jnp.float32)
    logits = jnp.einsum("nd,ds->ns", u32, w32, precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    # The bias only decides which slots win; it never receives a gradient.
    choice = probs + jax.lax.stop_gradient(bias.astype(jnp.float32))[None, :]
    # lax.top_k is stable: equal scores come out lowest index first (the tie-break of
    # docs/architecture.md#determinism).
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.moe_topk)
    indices = indices.astype(jnp.int32)
    weights = jnp.take_along_axis(probs, indices, axis=-1) * cfg.routed_scaling_factor
    return weights, indices, probs


def expert_load(indices: jax.Array, cfg: Config, valid: jax.Array | None = None) -> jax.Array:
    """Assignments per slot, [slots] int32, from indices [N, K] (input to the aux-loss-free bias update).

    valid [N] (False = padding): a padding token's assignments count as no load.
    """
    if valid is not None:
        # Slot num_slots lies past the end: bincount(length=num_slots) drops it.
        indices = jnp.where(valid[:, None], indices, cfg.num_slots)
    # Integer scatter-add: exact, so order does not matter.
    return jnp.bincount(indices.reshape(-1), length=cfg.num_slots).astype(jnp.int32)


# --- Shared sort / combine ---------------------------------------------------------------------------------


def _replicate_sorted(x, order, k):
    """x [N, D] -> [N*K, D] rows in sorted assignment order.

    Broadcast over K then permute, instead of gathering x[order // k]: the backward pass is then a reduction
    over K plus a collision-free permutation, with no duplicate-index scatter-add (deterministic gradients).
    """
    n, d = x.shape
    return jnp.broadcast_to(x[:, None, :], (n, k, d)).reshape(n * k, d)[order]


def _sort_assignments(indices: jax.Array, n_experts: int):
    """Stable sort of the flattened [N*K] assignments by expert, identity slots last.

    Returns order [N*K] (sorted position -> flat assignment), sorted expert ids [N*K] (identity mapped to E),
    starts [E+1] (first sorted position of each routed expert; starts[E] = number of routed assignments).
    """
    flat = jnp.minimum(indices.reshape(-1), n_experts)  # every identity slot becomes E
    # Stable: within one expert, assignments stay in (token, slot) order, which also defines capacity rank.
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    starts = jnp.searchsorted(sorted_e, jnp.arange(n_experts + 1, dtype=sorted_e.dtype), side="left")
    return order, sorted_e, starts.astype(jnp.int32)


def _combine(y_sorted, order, x, weights, indices, n_experts):
    """Un-permute routed outputs to [N, K, D] and reduce over K in a fixed order, adding the identity term.

    y_sorted: [N*K, D] expert outputs in sorted order (zero rows where dropped or identity).
    Returns [N, D] in x's dtype; the weighted sum runs in f32.
    """
    n, k = indices.shape
    # Inverse permutation by argsort of a permutation: a gather, not a scatter.
    inv = jnp.argsort(order)
    y = y_sorted[inv].reshape(n, k, -1)  # [N, K, D]
    w = weights.astype(jnp.float32)
    is_id = indices >= n_experts
    w_routed = jnp.where(is_id, 0.0, w)
    # Added slot by slot rather than jnp.sum over K: XLA:CPU turns that multiply-reduce into N tiny [1, K] x
    # [K, D] matmuls, the slowest op of a prefill step; this stays one elementwise pass with the gather fused.
    routed = w_routed[:, 0, None] * y[:, 0].astype(jnp.float32)
    for j in range(1, k):
        routed = routed + w_routed[:, j, None] * y[:, j].astype(jnp.float32)
    id_gate = jnp.sum(jnp.where(is_id, w, 0.0), axis=1, keepdims=True)  # [N, 1]
    return (routed + id_gate * x.astype(jnp.float32)).astype(x.dtype)


# --- Dispatch ----------------------------------------------------------------------------------------------


def tiled_experts() -> bool:
    """Whether `grouped_swiglu` runs `tiled_expert_ffn` (each expert's matmuls in a branch of their own)
    rather than `lax.ragged_dot`, which only GPU and TPU lower to a grouped matmul."""
    return jax.default_backend() not in ("gpu", "tpu")


def grouped_swiglu(xs, sorted_e, starts, w_gate, w_up, w_down) -> jax.Array:
    """SwiGLU of expert-sorted rows, each through its own expert; rows of no expert come out 0.

    The grouped matmul is jax.lax.ragged_dot on GPU/TPU and `tiled_expert_ffn` elsewhere (same result).

    Args:
      xs: [M, D] rows sorted by expert; sorted_e [M] their experts (>= E: no expert, sorted last).
      starts: [E+1] int32 first row of each expert (starts[E] = rows of any expert).
      w_gate, w_up: [E, D, Fe]; w_down: [E, Fe, D]; in xs's dtype (or bfloat16 for float32 xs in the CPU
        serving step: `cpu_serving.compute_weight`).
    Returns:
      [M, D] in xs's dtype.
    """
    n_experts = w_gate.shape[0]
    group_sizes = starts[1:] - starts[:-1]  # [E]; rows of no expert sit past starts[E]
    # Rows outside every group: ragged_dot zero-fills them on CPU, but the masks make the result (and its
    # gradient to xs) independent of what a backend leaves there.
    is_routed = (sorted_e < n_experts)[:, None]
    xs = jnp.where(is_routed, xs, 0)
    if not tiled_experts():
        g = jax.lax.ragged_dot(xs, w_gate, group_sizes)
        u = jax.lax.ragged_dot(xs, w_up, group_sizes)
        y = jax.lax.ragged_dot(jax.nn.silu(g) * u, w_down, group_sizes)  # [M, D]
    else:
        # XLA:CPU lowers ragged_dot to a dense matmul over every expert (E times the work). The CPU serving
        # step runs up to 32 rows per expert in one custom call (`cpu_serving.grouped_swiglu`); elsewhere the
        # loop over tiles. Tiles of 64 rows suit training. Below that, a tile holds the rows an expert gets on
        # average (a power of two), 2 to 16: each tile reads its expert's weights again, the rows it holds
        # past its expert's last are computed in full. On the serving benchmark's model and a 2-core Intel
        # Xeon (AVX-512) this made decode steps of 32 rows and prefill chunks of 64-224 tokens 1-6% faster
        # than tiles of half the average, which an AMD EPYC had favoured by 3-9% on 128-256-token chunks.
        # Not 1: XLA:CPU emits its own code for a one-row matmul, and 32 experts' worth of them in every layer
        # more than doubled the decode step's compile time for a step at most 3% faster.
        per_expert = -(-xs.shape[0] // n_experts)
        if cpu_serving.grouped_applies(per_expert, xs, w_down):  # the CPU serving step
            y = cpu_serving.grouped_swiglu(xs, starts, w_gate, w_up, w_down)
        else:
            tile = 64 if per_expert >= 64 else min(16, max(2, 1 << (per_expert - 1).bit_length()))
            y = tiled_expert_ffn(xs, starts, w_gate, w_up, w_down, tile)
    return jnp.where(is_routed, y, 0)


def moe_dropless(x, weights, indices, w_gate, w_up, w_down, cfg: Config) -> jax.Array:
    """Dropless expert FFN: sort by expert, grouped matmul (`grouped_swiglu`), fixed-order combine.

    Args:
      x: [N, D] tokens; weights [N, K] f32; indices [N, K] int32 slots (>= E are identity experts).
      w_gate, w_up: [E, D, Fe]; w_down: [E, Fe, D].
    Returns:
      [N, D] in x's dtype.
    """
    n_experts = w_gate.shape[0]
    dt = cfg.jnp_dtype
    order, sorted_e, starts = _sort_assignments(indices, n_experts)
    xs = _replicate_sorted(x.astype(dt), order, indices.shape[1])  # [N*K, D]
    w_gate, w_up, w_down = (cpu_serving.compute_weight(w, dt) for w in (w_gate, w_up, w_down))
    y = grouped_swiglu(xs, sorted_e, starts, w_gate, w_up, w_down)
    return _combine(y, order, x, weights, indices, n_experts)


def capacity(cfg: Config, n_tokens: int, n_experts: int) -> int:
    """Per-expert capacity ceil(cf * N * K / E), capped at N (top-k picks an expert once per token)."""
    return min(n_tokens, math.ceil(cfg.capacity_factor * n_tokens * cfg.moe_topk / n_experts))


def moe_capacity(x, weights, indices, w_gate, w_up, w_down, cfg: Config) -> jax.Array:
    """Capacity-factor expert FFN: [E, C, D] buffers, per-expert SwiGLU (`layers.expert_swiglu`);
    over-capacity assignments are dropped.

    The rank of an assignment inside its expert follows token order; ranks >= C contribute 0. Identity experts
    need no buffer and are never dropped. Shapes as in `moe_dropless`.
    """
    n, k = indices.shape
    n_experts = w_gate.shape[0]
    cap = capacity(cfg, n, n_experts)
    dt = cfg.jnp_dtype
    order, sorted_e, starts = _sort_assignments(indices, n_experts)
    group_sizes = starts[1:] - starts[:-1]
    xs = _replicate_sorted(x.astype(dt), order, k)  # [N*K, D] sorted by expert
    # Dispatch by gather: buffer slot (e, c) reads sorted row starts[e] + c when c < group size.
    c_idx = jnp.arange(cap, dtype=jnp.int32)
    src = jnp.minimum(starts[:-1, None] + c_idx[None, :], n * k - 1)  # [E, C]
    valid = c_idx[None, :] < group_sizes[:, None]  # [E, C]
    buf = jnp.where(valid[..., None], xs[src], 0)  # [E, C, D]
    out = expert_swiglu(buf, w_gate, w_up, w_down)  # [E, C, D]
    # Gather back: sorted row i holds rank i - starts[e] inside expert e.
    rank = jnp.arange(n * k, dtype=jnp.int32) - starts[jnp.minimum(sorted_e, n_experts - 1)]
    kept = (sorted_e < n_experts) & (rank < cap)
    y = out[jnp.minimum(sorted_e, n_experts - 1), jnp.clip(rank, 0, cap - 1)]  # [N*K, D]
    y = jnp.where(kept[:, None], y, 0)
    return _combine(y, order, x, weights, indices, n_experts)


# --- Expert parallelism ----------------------------------------------------------------------------------


def _within_capacity(indices, n_experts: int, cap: int, plan: expert_parallel.EPPlan):
    """indices [n, K] of this device's tokens with the assignments `moe_capacity` drops replaced by E.

    A rank inside an expert follows token order over all N tokens: this device's own rank plus the
    assignments of the token shards before it, so exactly the one-device drops happen.
    """
    n, k = indices.shape
    order, sorted_e, starts = _sort_assignments(indices, n_experts)
    e = jnp.minimum(sorted_e, n_experts - 1)
    offset = expert_parallel.earlier_counts(starts[1:] - starts[:-1], plan)
    rank = (jnp.arange(n * k, dtype=jnp.int32) - starts[e] + offset[e])[jnp.argsort(order)].reshape(n, k)
    return jnp.where(rank < cap, indices, n_experts)


def _local_experts(rows, experts, w_gate, w_up, w_down):
    """Received rows [M, D] through this device's experts; experts [M] int32 names each row's local expert
    (E_loc = none: the row comes out 0). Sorted by expert for `grouped_swiglu`, returned in rows' order."""
    order, sorted_e, starts = _sort_assignments(experts[:, None], w_gate.shape[0])
    y = grouped_swiglu(rows[order], sorted_e, starts, w_gate, w_up, w_down)
    return y[jnp.argsort(order)]


def moe_expert_parallel(x, weights, indices, w_gate, w_up, w_down, cfg: Config,
                        plan: expert_parallel.EPPlan) -> jax.Array:
    """`moe_dropless` (or, with a capacity factor, `moe_capacity`) with the experts split over devices
    (docs/architecture.md#expert-parallelism).

    Each device takes its share of the tokens, sorts their assignments by expert, sends the rows to the
    devices holding those experts by all-to-all (expert_parallel.py), runs its own experts over what arrives
    with `grouped_swiglu`, and combines what comes back for its tokens (`_combine`: the identity term never
    leaves the device). The drops of a capacity are the one-device ones (rank in token order over all N).
    Shapes as in `moe_dropless`; w_* are split over plan.expert_axes, E must divide by plan.ep.
    """
    n, k = indices.shape
    n_experts = w_gate.shape[0]
    if n_experts % plan.ep:
        raise ValueError(f"{n_experts} experts do not split over {'+'.join(plan.expert_axes)} = {plan.ep}")
    e_local, dt = n_experts // plan.ep, cfg.jnp_dtype
    cap = None if cfg.capacity_factor is None else capacity(cfg, n, n_experts)

    def local(tokens, experts):
        x, weights, indices = tokens
        w_gate, w_up, w_down = (w.astype(dt) for w in experts)
        sent_idx = indices if cap is None else _within_capacity(indices, n_experts, cap, plan)
        order, sorted_e, starts = _sort_assignments(sent_idx, n_experts)
        xs = _replicate_sorted(x.astype(dt), order, k)  # [n*K, D]
        block = expert_parallel.block_rows(x.shape[0], k, e_local, cap)
        rows, row_experts, sent = expert_parallel.send_to_experts(xs, starts, plan, block)
        y = _local_experts(rows, row_experts, w_gate, w_up, w_down)
        y = expert_parallel.return_from_experts(y, sent, plan, xs.shape[0])  # [n*K, D], zero where not sent
        if plan.mlp_axes:  # each device ran its slice of Fe: sum the partial outputs
            y = jax.lax.psum(y, plan.mlp_axes)
        return _combine(y, order, x, weights, indices, n_experts)

    # Padding tokens pick identity slot E with weight 0: they add exactly 0 and send nothing.
    specs = (plan.weight_spec(2), plan.weight_spec(2), plan.weight_spec(1))
    return expert_parallel.ep_map(local, plan, (x, weights, indices), (0, 0, n_experts),
                                  (w_gate, w_up, w_down), specs)


# --- Module ------------------------------------------------------------------------------------------------


class MoE(nnx.Module):
    """Router (`classifier`, `bias`) plus E routed SwiGLU experts; zero experts hold no parameters."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        pd, D, Fe, E = cfg.jnp_param_dtype, cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.n_routed_experts
        self.cfg = cfg
        # Router weight and correction bias stay f32 whatever the param dtype (HF _keep_in_fp32_modules).
        self.classifier = param(rngs, (D, cfg.num_slots), ("embed", "slots"), jnp.float32)
        self.bias = param(None, (cfg.num_slots,), ("slots",), jnp.float32, init="zeros")
        self.w_gate = param(rngs, (E, D, Fe), ("experts", "embed", "expert_mlp"), pd)
        self.w_up = param(rngs, (E, D, Fe), ("experts", "embed", "expert_mlp"), pd)
        self.w_down = param(rngs, (E, Fe, D), ("experts", "expert_mlp", "embed"), pd)

    def route_tokens(self, u, token_mask=None):
        """Routing of u [B, T, D] as N = B*T tokens: (weights [N, K], indices [N, K], probs [N, slots]).

        token_mask [B, T] (False = padding) sends padding tokens to zero experts with weight 0, so they cost
        no expert compute and do not count as load.
        """
        weights, indices, probs = route(u.reshape(-1, u.shape[-1]), self.classifier[...], self.bias[...],
                                        self.cfg)
        if token_mask is not None:
            weights, indices = mask_padding(weights, indices, token_mask.reshape(-1), self.cfg)
        return weights, indices, probs

    def forward(self, u, token_mask=None, rules=RULES):
        """u [B, T, D] -> (out [B, T, D] in u's dtype, expert load [slots] int32, balance loss scalar f32).

        Under a mesh whose expert axes (by `rules`, the table the parameters were placed by) have size > 1
        the dispatch is expert-parallel (`moe_expert_parallel`); otherwise it runs as on one device.
        """
        cfg = self.cfg
        x = u.reshape(-1, u.shape[-1])
        weights, indices, probs = self.route_tokens(u, token_mask)
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        plan = expert_parallel.ep_plan(rules)
        if plan is not None:
            out = moe_expert_parallel(x, weights, indices, *experts, cfg, plan)
        else:
            dispatch = moe_dropless if cfg.capacity_factor is None else moe_capacity
            out = dispatch(x, weights, indices, *experts, cfg)
        valid = None if token_mask is None else token_mask.reshape(-1)
        load = expert_load(indices, cfg, valid)
        return out.reshape(u.shape), load, balance_loss(probs, indices, cfg, valid)

    def __call__(self, u):
        """u [B, T, D] -> [B, T, D] in u's dtype."""
        return self.forward(u)[0]


def mask_padding(weights, indices, valid, cfg: Config):
    """Route padding tokens (valid False) to zero experts with weight 0 (their output is exactly 0)."""
    if cfg.zero_expert_num:
        pad = cfg.n_routed_experts + jnp.arange(cfg.moe_topk, dtype=indices.dtype) % cfg.zero_expert_num
        indices = jnp.where(valid[:, None], indices, pad[None, :])
    return jnp.where(valid[:, None], weights, 0.0), indices


def balance_loss(probs, indices, cfg: Config, valid=None):
    """Load-balance loss with the zero experts as one group (docs/architecture.md#balance).

    Groups are the E routed experts plus one group of all zero experts; with f_g the share of top-k
    assignments and P_g the mean router probability of group g, loss = G * sum_g f_g P_g
    (1.0 when perfectly balanced).
    """
    E, G = cfg.n_routed_experts, cfg.n_routed_experts + (1 if cfg.zero_expert_num else 0)
    w = jnp.ones(probs.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
    group_of = jnp.minimum(jnp.arange(cfg.num_slots), E)  # every zero slot maps to group E
    p_group = jnp.zeros((probs.shape[0], G), jnp.float32).at[:, group_of].add(probs)
    hits = jax.nn.one_hot(jnp.minimum(indices, E), G, dtype=jnp.float32).sum(1)  # [N, G]
    n = jnp.maximum(w.sum(), 1.0)
    f = jax.lax.stop_gradient((hits * w[:, None]).sum(0) / (n * cfg.moe_topk))
    p_mean = (p_group * w[:, None]).sum(0) / n
    return G * jnp.sum(f * p_mean)
