"""Optimizer: Muon for hidden matrices, AdamW for the rest, warmup + cosine/WSD schedules, ZeRO-1 shardings.

Follows docs/architecture.md#optimizer (the Muon proposal):
  - Muon (Nesterov momentum 0.95, 5 Newton-Schulz steps, coefficients (3.4445, -4.7750, 2.0315)) for every
    2-D hidden matrix. Each *logical* matrix is orthogonalised as a whole: leading stacked axes (the scanned
    `layers` axis, the `experts` axis, the N-gram branch axis) are batch axes, and a head-stacked weight is
    one 2-D matrix (w_q_up as [Rq, N*H], w_kv_up as [R, N*(Hn+Hv)], w_o as [N*Hv, D], indexer wq_b as
    [Rq, I*J]).
  - Each Muon update is scaled by 0.2 * sqrt(max(fan_in, fan_out)) of its logical matrix (optax's
    `consistent_rms=0.2`; Liu et al. 2025, "Muon is Scalable for LLM Training"), so its RMS matches AdamW's
    and both use one learning rate.
  - AdamW for the token embeddings, the N-gram tables, the LM head, every norm weight, the router classifier
    and the indexer's weights projection. Decoupled weight decay applies to matrices, never to norm weights.
  - The router correction bias `moe.bias` is "frozen" here (the design in docs/architecture.md#optimizer lists
    it under AdamW, but its gradient is zero): the trainer moves it with the aux-loss-free balancing rule
    (docs/architecture.md#balance).

A parameter's rule comes from its path in a fixed table; an unknown path raises instead of falling back to a
default, so a new parameter can never silently get the wrong optimizer.

optax's Muon does Newton-Schulz matmuls whose contracting dimensions may be sharded, which raises
ShardingTypeError under an `AxisType.Explicit` mesh; `make_optimizer` runs the update under
`jax.sharding.auto_axes` there and gives every output the sharding its input had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers, scale_by_muon

LABELS = ("muon", "adamw", "frozen")
# Jordan's quintic Newton-Schulz coefficients (docs/architecture.md#optimizer).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """Optimizer hyper-parameters (run settings, not model config).

    The learning rate schedule is a linear warmup to `lr`, then either a cosine decay to `min_lr_ratio * lr`
    at `total_steps`, or WSD: constant `lr`, then a linear decay to `min_lr_ratio * lr` over the last
    `wsd_decay_fraction * total_steps` steps. `clip_norm=None` turns global-norm clipping off. With
    `use_muon=False` the Muon matrices are trained with AdamW too (a baseline).
    """

    lr: float = 3e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"  # "cosine" | "wsd"
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    use_muon: bool = True
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    muon_beta: float = 0.95
    muon_ns_steps: int = 5
    muon_consistent_rms: float = 0.2  # Muon update RMS (AdamW-like): x 0.2 * sqrt(max(fan_in, fan_out))

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"OptimizerSettings: {msg}")

        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        need(
            0 <= self.warmup_steps < self.total_steps,
            f"warmup_steps must be in [0, total_steps={self.total_steps}), got {self.warmup_steps}",
        )
        need(self.schedule in ("cosine", "wsd"), f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(
            0 < self.wsd_decay_fraction <= 1,
            f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}",
        )
        if self.schedule == "wsd":
            need(
                self.warmup_steps <= self.total_steps - self.wsd_decay_steps,
                f"warmup ({self.warmup_steps}) overlaps the WSD decay "
                f"(last {self.wsd_decay_steps} of {self.total_steps} steps)",
            )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(
            self.clip_norm is None or self.clip_norm > 0,
            f"clip_norm must be > 0 or None, got {self.clip_norm}",
        )
        need(0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1, "adam_b1 and adam_b2 must be in [0, 1)")
        need(0 <= self.muon_beta < 1, f"muon_beta must be in [0, 1), got {self.muon_beta}")
        need(self.muon_ns_steps >= 1, f"muon_ns_steps must be >= 1, got {self.muon_ns_steps}")

    @property
    def wsd_decay_steps(self) -> int:
        return max(1, round(self.wsd_decay_fraction * self.total_steps))


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
    """The learning rate as a function of the step (0-based count of updates already applied).

    Warmup is lr * (step + 1) / (warmup_steps + 1), so the very first update already moves the weights, and
    it reaches lr at step == warmup_steps. After total_steps the rate stays at min_lr_ratio * lr.

    Returns:
      step (int scalar, traced or not) -> float32 scalar.
    """
    s = settings
    peak, floor, warm = s.lr, s.lr * s.min_lr_ratio, s.warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * jnp.minimum(1.0, (step + 1.0) / (warm + 1.0))
        if s.schedule == "cosine":
            frac = jnp.clip((step - warm) / (s.total_steps - warm), 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:  # wsd: stable at peak, then linear decay over the last wsd_decay_steps
            start = s.total_steps - s.wsd_decay_steps
            frac = jnp.clip((step - start) / s.wsd_decay_steps, 0.0, 1.0)
            after = peak - (peak - floor) * frac
        return jnp.where(step < warm, warmup, after)

    return schedule


class _Rule(NamedTuple):
    label: str  # "muon" | "adamw" | "frozen"
    ndim: int  # rank of one unstacked parameter (the `layers` stack adds one leading axis)
    # Muon (reduction, output) axes, counted from the end; every axis before them is a batch axis.
    matrix: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    decay: bool = True  # decoupled weight decay (never for norm weights)


_VEC = ((-2,), (-1,))  # a plain [in, out] matrix (after any leading batch axes)
_NORM = _Rule("adamw", 1, decay=False)

# Paths are normalised: the `layers/` and `mtp/` prefixes are dropped and trailing sublayer digits removed
# (attn0 -> attn), so one entry covers the trunk, every sublayer and the MTP block.
_RULES: dict[str, _Rule] = {
    "embed": _Rule("adamw", 2),
    "lm_head": _Rule("adamw", 2),
    "final_norm/weight": _NORM,
    "norm_in/weight": _NORM,
    "norm_post/weight": _NORM,
    "enorm/weight": _NORM,
    "hnorm/weight": _NORM,
    "attn/q_norm": _NORM,
    "attn/kv_norm": _NORM,
    "attn/w_q_down": _Rule("muon", 2, _VEC),
    "attn/w_kv_down": _Rule("muon", 2, _VEC),
    "attn/w_q_up": _Rule("muon", 3, ((-3,), (-2, -1))),  # [Rq, N, H] as [Rq, N*H]
    "attn/w_kv_up": _Rule("muon", 3, ((-3,), (-2, -1))),  # [R, N, Hn+Hv] as [R, N*(Hn+Hv)]
    "attn/w_o": _Rule("muon", 3, ((-3, -2), (-1,))),  # [N, Hv, D] as [N*Hv, D]
    "indexer/k_norm": _NORM,
    "indexer/wq_b": _Rule("muon", 3, ((-3,), (-2, -1))),  # [Rq, I, J] as [Rq, I*J]
    "indexer/wk": _Rule("muon", 2, _VEC),
    "indexer/weights_proj": _Rule("adamw", 2),
    "mlp/w_gate": _Rule("muon", 2, _VEC),
    "mlp/w_up": _Rule("muon", 2, _VEC),
    "mlp/w_down": _Rule("muon", 2, _VEC),
    "moe/classifier": _Rule("adamw", 2),
    "moe/bias": _Rule("frozen", 1, decay=False),
    "moe/w_gate": _Rule("muon", 3, _VEC),  # [E, D, Fe]: per expert
    "moe/w_up": _Rule("muon", 3, _VEC),
    "moe/w_down": _Rule("muon", 3, _VEC),
    "ngram/tables": _Rule("adamw", 2),
    "ngram/proj": _Rule("muon", 3, _VEC),  # [G, dn, D]: per N-gram branch
    "w_eh": _Rule("muon", 2, _VEC),  # MTP eh_proj [2D, D]
}


def _path_names(path) -> list[str]:
    """Key path -> list of names; drops the `.value` step that nnx.Variable leaves add."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(key))
    return names


def _rule(path, leaf) -> _Rule:
    """The rule for one parameter; raises ValueError for an unknown path or an unexpected rank."""
    names = _path_names(path)
    stacked = names[:1] == ["layers"]
    core = names[1:] if names[:1] in (["layers"], ["mtp"]) else names
    key = "/".join([n.rstrip("0123456789") for n in core[:-1]] + core[-1:])
    rule = _RULES.get(key)
    where = "/".join(names)
    if rule is None:
        raise ValueError(
            f"optimizer: no rule for parameter {where!r} (normalised {key!r}); add it to optim._RULES"
        )
    want = rule.ndim + int(stacked)
    if len(leaf.shape) != want:
        raise ValueError(f"optimizer: parameter {where!r} has shape {leaf.shape}, expected rank {want}")
    return rule


def _map(fn, tree):
    """tree_map_with_path with each leaf's rule; optax MaskedNode subtrees have no leaves and pass through."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(path, x, _rule(path, x)), tree)


def param_labels(params) -> Any:
    """Same-structure pytree of "muon" | "adamw" | "frozen" (docs/architecture.md#optimizer). Raises
    ValueError on unknown paths.

    Works on nnx.State (leaves stay wrapped in their Variables) and on nested dicts of arrays or
    ShapeDtypeStructs."""
    return _map(lambda path, x, r: r.label, params)


def weight_decay_mask(params) -> Any:
    """Same-structure pytree of bool: True where decoupled weight decay applies (matrices, not norms)."""
    return _map(lambda path, x, r: r.decay, params)


def muon_dimension_numbers(params) -> Any:
    """Same-structure pytree of MuonDimensionNumbers (non-negative axes) for Muon leaves, None elsewhere.

    Axes not named are batch axes, orthogonalised independently (layers, experts, N-gram branches).
    """

    def dims(path, x, r):
        if r.label != "muon":
            return None
        red, out = r.matrix
        n = len(x.shape)
        return MuonDimensionNumbers(tuple(a % n for a in red), tuple(a % n for a in out))

    return _map(dims, params)


def _scale_to_adam_rms(rms: float) -> optax.GradientTransformation:
    """Scale each orthogonalised update by rms * sqrt(max(fan_in, fan_out)) of its logical matrix.

    An orthogonal [m, n] matrix has RMS 1/sqrt(max(m, n)), so every Muon update gets an RMS of about `rms`,
    AdamW's typical update RMS (0.2), and Muon and AdamW share one learning rate (optax `consistent_rms`;
    written here because optax does not export its `scale_by_shape`).
    """

    def scale(path, u, r):
        red, out = r.matrix
        fan_in = math.prod(u.shape[a] for a in red)
        fan_out = math.prod(u.shape[a] for a in out)
        return u * jnp.asarray(rms * math.sqrt(max(fan_in, fan_out)), u.dtype)

    return optax.GradientTransformation(
        optax.init_empty_state, lambda updates, state, params=None: (_map(scale, updates), state)
    )


def _explicit_safe(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run tx.update under auto_axes when the ambient mesh has Explicit axes (optax Muon's Newton-Schulz
    matmuls raise ShardingTypeError on sharded contracting dims there); outputs keep their inputs'
    shardings."""

    def update(updates, state, params=None):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not mesh.explicit_axes:
            return tx.update(updates, state, params)

        def spec(t):
            return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, t)

        return jax.sharding.auto_axes(tx.update, out_sharding=(spec(updates), spec(state)))(
            updates, state, params
        )

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(settings: OptimizerSettings, params) -> optax.GradientTransformation:
    """Global-norm clipping, then Muon / AdamW / frozen by `param_labels`, all on `learning_rate_schedule`.

    Args:
      settings: the hyper-parameters.
      params: the parameter pytree (nnx.State, or nested dicts of arrays or ShapeDtypeStructs); only used to
        check, before anything compiles, that every parameter has a rule. The transformation recomputes labels
        from the tree it is given, so it works on nnx.State and on plain dicts alike.

    Returns:
      An optax GradientTransformation. Its `update(grads, state, params)` needs `params` (weight decay).
    """
    param_labels(params)  # fail fast on unknown paths
    lr = learning_rate_schedule(settings)
    s = settings
    # The mask is called on optax.partition's masked subtree; paths are unchanged there.
    adamw = optax.adamw(
        lr, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps, weight_decay=s.weight_decay, mask=weight_decay_mask
    )
    if s.use_muon:
        muon = optax.chain(
            # One coefficient row per step makes optax run Newton-Schulz as a lax.scan instead of unrolling
            # it: the same arithmetic, less HLO per matrix (XLA compile time dominates small runs).
            scale_by_muon(
                (NS_COEFFS,) * s.muon_ns_steps,
                s.muon_ns_steps,
                s.muon_beta,
                nesterov=True,
                weight_dimension_numbers=muon_dimension_numbers,
            ),
            _scale_to_adam_rms(s.muon_consistent_rms),
            optax.add_decayed_weights(s.weight_decay),
            optax.scale_by_learning_rate(lr),
        )
    else:
        muon = adamw
    parts = optax.partition({"muon": muon, "adamw": adamw, "frozen": optax.set_to_zero()}, param_labels)
    clip = optax.clip_by_global_norm(s.clip_norm) if s.clip_norm is not None else optax.identity()
    return _explicit_safe(optax.chain(clip, parts))


def zero1_state_shardings(opt_state, mesh: jax.sharding.Mesh, dp_axis: str = "dp") -> Any:
    """ZeRO-1: shardings for the optimizer state that also split each leaf over the data-parallel axis.

    Each leaf keeps its current NamedSharding (or starts replicated) and is also sharded over `dp_axis` on its
    first dimension that is not already sharded and whose size divides by the dp size. Leaves already sharded
    over `dp_axis`, scalars and leaves with no such dimension stay as they are.

    Args:
      opt_state: optimizer state whose leaves are arrays or ShapeDtypeStructs (with or without a sharding).
      mesh: the device mesh; must have `dp_axis`.
      dp_axis: the data-parallel mesh axis name.

    Returns:
      A pytree of NamedSharding with the structure of opt_state (use as jit out_shardings).
    """
    if dp_axis not in mesh.axis_names:
        raise ValueError(f"zero1_state_shardings: mesh axes {mesh.axis_names} have no {dp_axis!r}")
    dp = mesh.shape[dp_axis]

    def one(x):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        spec = [None] * len(shape)
        if isinstance(sharding, NamedSharding):
            spec[: len(sharding.spec)] = list(sharding.spec)
        used = {a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
        if not used <= set(mesh.axis_names):
            raise ValueError(
                f"zero1_state_shardings: leaf spec {P(*spec)} names axes not in mesh {mesh.axis_names}"
            )
        if dp > 1 and dp_axis not in used:
            free = [i for i, (n, s) in enumerate(zip(shape, spec)) if s is None and n % dp == 0]
            if free:
                spec[free[0]] = dp_axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(one, opt_state)

