"""Expert parallelism (EP): expert-sorted rows travel to the devices that hold their experts by all-to-all,
under `jax.shard_map` (docs/architecture.md#expert-parallelism).

The experts' logical axis ("experts") resolves through the rules table to the expert mesh axes (`ep` by
default). When those have a total size ep > 1, each device holds E_loc = E / ep experts, and the tokens are
split over the token axes (the batch's mesh axes, then the expert axes), so that every device routes its own
n tokens (`ep_map`). The shard_map is manual over every axis it touches, the experts' hidden width's
(`expert_mlp`, tp by default) included: each device runs its slice of Fe and the partial outputs are psum-ed,
so XLA adds no collective of its own inside the expert loop, whose trip count differs from device to device.
Per device, with the n*K assignments sorted by expert (moe.py), the rows for expert shard s are the contiguous
range [starts[s * E_loc], starts[(s + 1) * E_loc]); rows of no routed expert sort last and stay home.

  `send_to_experts`      one all-to-all of the per-expert counts [ep, E_loc], then the rows themselves
  (the expert shard runs its E_loc experts over what it received, moe.py)
  `return_from_experts`  the reverse exchange puts every output row where its input row was

Two exchanges, one receive layout (source after source, each source's rows ordered by expert):
  ragged  `lax.ragged_all_to_all` (GPU, TPU): only the real rows travel;
  padded  `lax.all_to_all` of zero-padded [ep, M, D] blocks, since XLA:CPU has no ragged all-to-all.
Both receive into a worst-case buffer of ep * M rows, M = `block_rows` = the most rows one device can send one
expert shard, so nothing is ever dropped for lack of room. The values are those of the one-device dispatch;
only where the rows are computed changes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import RULES, logical_to_spec


@dataclasses.dataclass(frozen=True)
class EPPlan:
    """How one MoE call is split (static)."""

    mesh: object  # the active mesh (abstract)
    expert_axes: tuple[str, ...]  # mesh axes the experts are split over, in PartitionSpec order
    mlp_axes: tuple[str, ...]  # mesh axes of the experts' hidden width Fe: partial outputs are psum-ed
    token_axes: tuple[str, ...]  # mesh axes the tokens are split over: the batch's, then the experts'
    ep: int  # expert shards
    token_shards: int

    def weight_spec(self, mlp_dim: int) -> P:
        """PartitionSpec of an expert weight, [E, D, Fe] (mlp_dim 2) or [E, Fe, D] (mlp_dim 1), inside EP."""
        spec = [self.expert_axes, None, None]
        spec[mlp_dim] = self.mlp_axes or None
        return P(*spec)


def _mesh_axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, one mesh axis or several) as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def ep_plan(rules=RULES) -> EPPlan | None:
    """The EP split under the active mesh (`jax.set_mesh`), or None where the experts are not split (no mesh,
    or their mesh axes have size 1): the caller then runs the one-device dispatch, partitioned by XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(mesh.shape)
    expert_axes = _mesh_axes(logical_to_spec(("experts",), rules, mesh.axis_names)[0])
    ep = math.prod(sizes[a] for a in expert_axes)
    if ep == 1:
        return None
    batch_axes = _mesh_axes(logical_to_spec(("batch",), rules, mesh.axis_names)[0])
    # Batch axes first: the flattened [B*T] tokens are already split that way, so entering exchanges no
    # tokens; an axis the rules give both (experts=ep with batch=dp+ep) splits the tokens once.
    token_axes = batch_axes + tuple(a for a in expert_axes if a not in batch_axes)
    mlp_axes = _mesh_axes(logical_to_spec(("expert_mlp",), rules, mesh.axis_names)[0])
    if set(mlp_axes) & set(token_axes):
        raise ValueError(f"expert_mlp on {'+'.join(mlp_axes)} and tokens on {'+'.join(token_axes)} share a "
                         "mesh axis: expert parallelism needs them apart")
    return EPPlan(mesh, expert_axes, mlp_axes, token_axes, ep, math.prod(sizes[a] for a in token_axes))


def ep_map(fn, plan: EPPlan, tokens: tuple, pads: tuple, experts: tuple, expert_specs: tuple) -> jax.Array:
    """fn(tokens, experts) run per device under `jax.shard_map`, manual over the token and Fe axes.

    tokens: arrays [N, ...] split over plan.token_axes; N is padded to a multiple of plan.token_shards with
      `pads` (one fill value per array), and the padding rows are cut from the output again.
    experts: arrays [E, ...] placed by expert_specs (`EPPlan.weight_spec`); the other token axes see copies.
    fn returns one [n, ...] array per device, the same on every device of the Fe axes; the result is [N, ...].
    """
    n = tokens[0].shape[0]
    extra = -n % plan.token_shards
    tokens = tuple(jnp.pad(t, [(0, extra)] + [(0, 0)] * (t.ndim - 1), constant_values=v)
                   for t, v in zip(tokens, pads, strict=True))
    tok = P(plan.token_axes)
    # check_vma=False: jax 0.10.2's searchsorted fails an internal assertion on mixed varying inputs. Without
    # the check the transpose is still exact: it sums the gradient of inputs replicated over a manual axis
    # (weights over dp, tokens over tp) and divides that of the output, replicated over tp, before the psum.
    out = jax.shard_map(fn, mesh=plan.mesh, in_specs=((tok,) * len(tokens), expert_specs), out_specs=tok,
                        axis_names=set(plan.token_axes + plan.mlp_axes), check_vma=False)(tokens, experts)
    return out[:n]


def block_rows(n: int, k: int, e_local: int, cap: int | None = None) -> int:
    """The most rows one device sends one expert shard: each of its n tokens picks an expert at most once, so
    n * min(K, E_loc); with a per-expert capacity also at most E_loc * min(n, cap)."""
    rows = n * min(k, e_local)
    return rows if cap is None else min(rows, e_local * min(n, cap))


def earlier_counts(counts: jax.Array, plan: EPPlan) -> jax.Array:
    """Per-expert assignment counts [E] summed over the token shards before this one in token order: what
    turns a rank inside this device's tokens into a rank among all N tokens."""
    every = jax.lax.all_gather(counts, plan.token_axes)  # [token_shards, E]
    before = jnp.arange(plan.token_shards) < jax.lax.axis_index(plan.token_axes)
    return jnp.sum(jnp.where(before[:, None], every, 0), axis=0)


def use_ragged() -> bool:
    """Whether the exchange is `lax.ragged_all_to_all` (GPU, TPU) rather than padded blocks (XLA:CPU)."""
    return jax.default_backend() in ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Sent:
    """What `return_from_experts` needs to undo one `send_to_experts` (this device's arrays)."""

    bounds: jax.Array  # [ep+1] int32: first sorted row for each expert shard; bounds[ep] = rows sent in all
    recv_sizes: jax.Array  # [ep] int32: rows received from each source
    recv_starts: jax.Array  # [ep] int32: where each source's rows begin in the receive buffer
    block: int  # M, rows per source in the receive buffer's worst case
    ragged: bool


def send_to_experts(xs: jax.Array, starts: jax.Array, plan: EPPlan, block: int):
    """Send each expert-sorted row to the shard that holds its expert.

    Args:
      xs: [R, D] this device's rows sorted by expert (rows past starts[E] are not sent).
      starts: [E+1] int32 first row of each expert, E = ep * E_loc global experts.
      block: M = `block_rows(...)`, at least what any device sends one shard.
    Returns:
      rows [ep * M, D] received (source after source, each source's rows by expert; zeros where unused),
      experts [ep * M] int32, the local expert of each row (E_loc for unused rows), and `Sent`.
    """
    ep, axes = plan.ep, plan.expert_axes
    e_local = (starts.shape[0] - 1) // ep
    bounds = starts[::e_local]  # shard s's experts start at global expert s * E_loc
    send_sizes = bounds[1:] - bounds[:-1]
    counts = (starts[1:] - starts[:-1]).reshape(ep, e_local)
    recv_counts = jax.lax.all_to_all(counts, axes, 0, 0)  # [source, local expert]
    recv_sizes = recv_counts.sum(axis=1)
    slot = jnp.arange(ep * block, dtype=jnp.int32)
    if use_ragged():
        recv_starts = jnp.cumsum(recv_sizes) - recv_sizes
        # Where this device's rows land on each receiver: that receiver's recv_starts entry for this source.
        land = jax.lax.all_to_all(recv_starts, axes, 0, 0, tiled=True)
        rows = jax.lax.ragged_all_to_all(xs, jnp.zeros((ep * block, xs.shape[1]), xs.dtype), bounds[:-1],
                                         send_sizes, land, recv_sizes, axis_name=axes)
        # Received rows come in (source, expert) segments.
        segment = jnp.searchsorted(jnp.cumsum(recv_counts.reshape(-1)), slot, side="right")
        experts = jnp.where(segment < ep * e_local, segment % e_local, e_local)
    else:
        recv_starts = jnp.arange(ep, dtype=jnp.int32) * block
        j = jnp.arange(block, dtype=jnp.int32)
        src = jnp.minimum(bounds[:-1, None] + j[None, :], xs.shape[0] - 1)  # [ep, M]
        buf = jnp.where((j[None, :] < send_sizes[:, None])[..., None], xs[src], 0)  # [ep, M, D]
        rows = jax.lax.all_to_all(buf, axes, 0, 0).reshape(ep * block, xs.shape[1])
        ends = jnp.cumsum(recv_counts, axis=1)  # [source, local expert]: one past each expert's rows
        experts = jax.vmap(lambda e: jnp.searchsorted(e, j, side="right"))(ends).reshape(-1)
    sent = Sent(bounds=bounds, recv_sizes=recv_sizes, recv_starts=recv_starts.astype(jnp.int32), block=block,
                ragged=use_ragged())
    return rows, experts.astype(jnp.int32), sent


def return_from_experts(y: jax.Array, sent: Sent, plan: EPPlan, n_rows: int) -> jax.Array:
    """The reverse of `send_to_experts`: y [ep * M, D] (the received rows' outputs, same layout) back to the
    devices they came from, as [n_rows, D] in the sender's sorted order, zero in rows that were not sent."""
    ep, axes, block = plan.ep, plan.expert_axes, sent.block
    send_sizes = sent.bounds[1:] - sent.bounds[:-1]
    if sent.ragged:
        # Where each source keeps the rows it sent here: its bounds entry for this shard.
        land = jax.lax.all_to_all(sent.bounds[:-1], axes, 0, 0, tiled=True)
        return jax.lax.ragged_all_to_all(y, jnp.zeros((n_rows, y.shape[1]), y.dtype), sent.recv_starts,
                                         sent.recv_sizes, land, send_sizes, axis_name=axes)
    back = jax.lax.all_to_all(y.reshape(ep, block, -1), axes, 0, 0).reshape(ep * block, -1)
    i = jnp.arange(n_rows, dtype=jnp.int32)
    shard = jnp.clip(jnp.searchsorted(sent.bounds, i, side="right") - 1, 0, ep - 1)
    out = back[shard * block + jnp.clip(i - sent.bounds[shard], 0, block - 1)]
    return jnp.where((i < sent.bounds[ep])[:, None], out, 0)
