"""Fused hashed N-gram lookup (docs/architecture.md#ngram): hash + row gather + projection + sum over G.

    out[b, t] = sum_g  T[off_g + id_g(b, t)] @ P_g          [B, T, D], f32 accumulation, cfg dtype out

Reference: `longcat_jax.model.ngram.ngram_embed(tables, proj, hash_ids(tokens, cfg, history), cfg)`, the
model's own embedding path. The ids are the same exact uint32 mulmod with the `ops.ngram_hash.hash_plan`
constants, so they are bit-identical to `hash_ids`.

Kernel ("pallas"): one `pl.pallas_call` over (token block, output-column block). Only the EOS-segmented
windows [N, tokens] (a cheap integer op, `ops.ngram_hash.segment_windows`) are computed outside. For every
branch g the kernel hashes the window, gathers the block's rows straight from the table ref by dynamic index,
multiplies by P_g and accumulates in f32, so neither the ids [tokens, G] nor the gathered embeddings
[tokens, G, ngram_dim] ever reach HBM: memory is the tables, the projections and the output only.
"xla" is the same computation in plain JAX. It materialises the gathered rows [tokens, G, ngram_dim]; that is
the size of the output itself, since G * ngram_dim = D in the LongCat models (16 * 512 = 8192), so it is
bounded the same way and needs no chunking.

Backward (`jax.custom_vjp`, plain XLA for both impls): d P_g = sum_t emb_g(t)^T d_out(t); d T is a dense
[rows, ngram_dim] array (what the optimizer takes) built from the per-token row gradients d_out(t) P_g^T by a
sort-and-segment-sum whose result does not depend on scatter order (`_sorted_row_sum`): bit-identical across
runs and backends, and nothing of size [rows, tokens] is formed (docs/architecture.md#determinism).

Row-sharded tables (embedding parallelism): the rows' logical name "ngram_rows" (`ops.ngram_hash.TABLE_AXES`)
resolves through the rules table (sharding/rules.py) to the rows' mesh axis, "vp" by default. With a mesh
whose rows axis has size > 1 (the `mesh` argument, else the mesh set with `jax.set_mesh`), forward and
backward run under `jax.shard_map` over that axis only. Each shard hashes every token, looks up only the rows
it owns (others give 0), projects, and the f32 partial outputs are psum-ed; in the backward each shard builds
the gradient of its own rows and the projection gradient is psum-ed. Projections stay replicated
(docs/architecture.md#ngram-sharding).

GPU lowering: written for the Triton backend (Triton compiler params, power-of-two blocks, all loads are
contiguous rows or a row gather, f32 dot accumulation); verified here only with interpret=True on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from longcat_jax.config import Config
from longcat_jax.ops.ngram_hash import TABLE_AXES, hash_plan, segment_windows, table_offsets
from pallas_kernels.impl import backend, compiler_params, interpret, resolve
from pallas_kernels.tpu_ngram_lookup import tpu_forward_local
from sharding.rules import RULES, logical_to_spec


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one lookup (hashable: it is a custom_vjp nondiff argument)."""

    cfg: Config
    impl: str
    block_t: int
    block_d: int
    mesh: object  # jax Mesh / AbstractMesh whose rows axis has size > 1, or None (unsharded)
    rows_axis: str | tuple[str, ...] | None  # mesh axis (or axes) of the table rows; None when unsharded


# --- hash: the uint32 mulmod of ops/ngram_hash.py, per branch, shared by the kernel and XLA -------------


def _hash_branch(cols: list[jax.Array], branch: int, cfg: Config) -> jax.Array:
    """id_g of every token: cols[d] = uint32 token d steps back (any shape); returns int32, same shape.

    Exactly `hash_ids` restricted to one branch: terms with a zero coefficient (orders that do not reach d
    steps back) are skipped at trace time, which leaves the reduced sum unchanged.
    """
    coef, moduli, w, chunks, reduce_tokens = hash_plan(cfg)
    r = jnp.uint32(int(moduli[branch]))
    mask = jnp.uint32((1 << w) - 1)
    acc = jnp.zeros_like(cols[0])
    for d, tok in enumerate(cols):
        if reduce_tokens:
            tok = tok % r
        for k in range(chunks):
            c = int(coef[d, k, branch])
            if c == 0:
                continue
            # chunk < 2^w and c < R, so chunk * c < 2^32 (choice of w); acc + term < 2R < 2^31.
            term = (((tok >> jnp.uint32(w * k)) & mask) * jnp.uint32(c)) % r
            acc = (acc + term) % r
    return acc.astype(jnp.int32)


def _hash_windows(windows_t: jax.Array, cfg: Config) -> jax.Array:
    """windows_t uint32 [N, P] -> ids int32 [P, G] (ids of each branch table, without offsets)."""
    cols = [windows_t[d] for d in range(cfg.ngram_n)]
    return jnp.stack([_hash_branch(cols, g, cfg) for g in range(cfg.ngram_branches)], axis=-1)


def _local_rows(ids: jax.Array, start: jax.Array, local_rows: int, cfg: Config):
    """Rows of this shard's table slice [start, start + local_rows): (clamped local row, owned mask)."""
    local = ids + jnp.asarray(table_offsets(cfg), jnp.int32) - start
    owned = (local >= 0) & (local < local_rows)
    return jnp.clip(local, 0, local_rows - 1), owned


# --- forward: Pallas kernel and XLA path on one shard's table slice ---------------------------------------


def _lookup_kernel(start_ref, win_ref, tables_ref, proj_ref, out_ref, *, cfg: Config, compute_dtype):
    start = start_ref[0]
    local_rows = tables_ref.shape[0]
    # One contiguous [block_t] load per window column (window transposed to [N, tokens] outside).
    cols = [win_ref[d, :] for d in range(cfg.ngram_n)]
    offsets = table_offsets(cfg)
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for g in range(cfg.ngram_branches):
        local = _hash_branch(cols, g, cfg) + (offsets[g] - start)
        owned = (local >= 0) & (local < local_rows)
        rows = tables_ref[jnp.clip(local, 0, local_rows - 1), :]  # [block_t, ngram_dim] row gather
        rows = jnp.where(owned[:, None], rows.astype(compute_dtype), 0)
        acc += jnp.dot(rows, proj_ref[g].astype(compute_dtype), preferred_element_type=jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def _forward_pallas(tables, proj, windows_t, start, plan: _Plan, out_dtype):
    cfg, bt, bd = plan.cfg, plan.block_t, plan.block_d
    n, tokens = windows_t.shape
    G, dim, D = proj.shape
    padded = pl.cdiv(tokens, bt) * bt
    # Padding tokens hash the all-zero window to row 0 of each branch (in range); their outputs are dropped.
    windows_t = jnp.pad(windows_t, ((0, 0), (0, padded - tokens)))
    kernel = functools.partial(_lookup_kernel, cfg=cfg, compute_dtype=cfg.jnp_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, D), out_dtype),
        grid=(padded // bt, D // bd),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (0,)),
            pl.BlockSpec((n, bt), lambda i, j: (0, i)),
            # The table is gathered by row inside the kernel: no block of it is staged, just a reference.
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((G, dim, bd), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        compiler_params=compiler_params(),
        interpret=interpret(),
    )(start, windows_t, tables, proj)
    return out[:tokens]


def _gather_owned(tables, windows_t, start, cfg: Config):
    """emb [P, G, ngram_dim] in cfg dtype; rows this shard does not own are zero."""
    local, owned = _local_rows(_hash_windows(windows_t, cfg), start[0], tables.shape[0], cfg)
    emb = jnp.take(tables, local, axis=0).astype(cfg.jnp_dtype)
    return jnp.where(owned[..., None], emb, 0)


def _forward_xla(tables, proj, windows_t, start, plan: _Plan, out_dtype):
    dt = plan.cfg.jnp_dtype
    emb = _gather_owned(tables, windows_t, start, plan.cfg)
    out = jnp.einsum("pgk,gkd->pd", emb, proj.astype(dt), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _forward_local(tables, proj, windows_t, start, plan: _Plan, out_dtype):
    pallas = tpu_forward_local if backend() == "mosaic" else _forward_pallas
    run = pallas if plan.impl == "pallas" else _forward_xla
    return run(tables, proj, windows_t, start, plan, out_dtype)


# --- backward: deterministic dense table gradient ----------------------------------------------------------


def _sorted_row_sum(rows: jax.Array, keys: jax.Array, values: jax.Array, num_rows: int) -> jax.Array:
    """Dense [num_rows, K] with out[r] = sum of values[p] over pairs with rows[p] == r; rows == num_rows drop.

    Determinism (docs/architecture.md#determinism): a scatter-add of colliding rows sums in whatever order the
    hardware applies the updates (atomics on GPU), so float results can change run to run. Instead the pairs
    are sorted by (row, key), where key is a unique canonical index of the pair (its token-major position), so
    the order is a function of the pairs alone, not of how they were laid out. A segmented inclusive scan then
    sums each row's run in a fixed binary-tree order, and the last element of each run - one per row, unique
    rows - is written with a plain scatter-set, which has no collisions and so no order. Cost: a sort of the
    tokens * G pairs and O(pairs * K) work; nothing of size [rows, tokens] exists.
    """
    # The positions ride along with the (row, key) sort and then gather the values in that order.
    positions = jnp.arange(rows.shape[0], dtype=jnp.int32)
    rows_sorted, _, perm = jax.lax.sort(
        (rows.astype(jnp.int32), keys.astype(jnp.int32), positions), num_keys=2
    )
    vals = values[perm]
    new_run = jnp.concatenate([jnp.ones((1,), bool), rows_sorted[1:] != rows_sorted[:-1]])
    run_end = jnp.concatenate([rows_sorted[1:] != rows_sorted[:-1], jnp.ones((1,), bool)])

    def segmented_add(a, b):
        (start_a, sum_a), (start_b, sum_b) = a, b
        return start_a | start_b, jnp.where(start_b[:, None], sum_b, sum_a + sum_b)

    _, run_sums = jax.lax.associative_scan(segmented_add, (new_run, vals))
    dest = jnp.where(run_end, rows_sorted, num_rows)  # one writer per row; everything else falls off the end
    return jnp.zeros((num_rows, values.shape[1]), values.dtype).at[dest].set(run_sums, mode="drop")


def _backward_local(tables, proj, windows_t, start, d_out, plan: _Plan):
    """(d tables slice [local rows, ngram_dim], un-reduced d proj [G, ngram_dim, D]) of one shard."""
    cfg, dt = plan.cfg, plan.cfg.jnp_dtype
    local, owned = _local_rows(_hash_windows(windows_t, cfg), start[0], tables.shape[0], cfg)
    emb = jnp.where(owned[..., None], jnp.take(tables, local, axis=0).astype(dt), 0)  # [P, G, k]
    d_out = d_out.astype(dt)
    d_proj = jnp.einsum("pgk,pd->gkd", emb, d_out, preferred_element_type=jnp.float32)
    d_emb = jnp.einsum("pd,gkd->pgk", d_out, proj.astype(dt), preferred_element_type=jnp.float32)
    num_rows = tables.shape[0]
    pair_rows = jnp.where(owned, local, num_rows).reshape(-1)  # rows of other shards are dropped
    pair_keys = jnp.arange(pair_rows.shape[0], dtype=jnp.int32)  # token-major (token, branch) index
    d_tables = _sorted_row_sum(pair_rows, pair_keys, d_emb.reshape(pair_rows.shape[0], -1), num_rows)
    return d_tables.astype(tables.dtype), d_proj


# --- custom_vjp over (tables, proj); sharded over the rows axis when the plan has a mesh -------------------


def _shard_start(tables_local, plan: _Plan) -> jax.Array:
    return (jax.lax.axis_index(plan.rows_axis) * tables_local.shape[0]).astype(jnp.int32).reshape(1)


def _axis_names(rows_axis) -> tuple[str, ...]:
    """A PartitionSpec entry (one mesh axis, several, or None) as a tuple of mesh axis names."""
    return () if rows_axis is None else (rows_axis,) if isinstance(rows_axis, str) else tuple(rows_axis)


def _shard_count(mesh, rows_axis) -> int:
    """How many slices the rows split into: the product of the rows axes' sizes in `mesh`."""
    return math.prod(dict(mesh.shape)[a] for a in _axis_names(rows_axis))


def _forward(tables, proj, windows_t, plan: _Plan):
    dt = plan.cfg.jnp_dtype
    if plan.mesh is None:
        return _forward_local(tables, proj, windows_t, jnp.zeros((1,), jnp.int32), plan, dt)

    def shard(tables_local, proj, windows_t):
        # Partials are summed in f32 and rounded once, as the unsharded kernel does.
        start = _shard_start(tables_local, plan)
        part = _forward_local(tables_local, proj, windows_t, start, plan, jnp.float32)
        return jax.lax.psum(part, plan.rows_axis).astype(dt)

    # check_vma=False: pallas_call out_shapes carry no varying-axes annotation; replication of the outputs is
    # by construction (psum), and the shard-local table gradient is declared row-sharded below.
    rows = P(plan.rows_axis, None)
    # A Mosaic kernel cannot sit where XLA still partitions automatically: on TPU every mesh axis is manual.
    mosaic = plan.impl == "pallas" and backend() == "mosaic"
    manual = plan.mesh.axis_names if mosaic else _axis_names(plan.rows_axis)
    sharded = jax.shard_map(shard, mesh=plan.mesh, in_specs=(rows, P(), P()), out_specs=P(),
                            axis_names=set(manual), check_vma=False)
    return sharded(tables, proj, windows_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lookup(tables, proj, windows_t, plan: _Plan):
    return _forward(tables, proj, windows_t, plan)


def _lookup_fwd(tables, proj, windows_t, plan: _Plan):
    return _forward(tables, proj, windows_t, plan), (tables, proj, windows_t)


def _lookup_bwd(plan: _Plan, residuals, d_out):
    tables, proj, windows_t = residuals
    if plan.mesh is None:
        d_tables, d_proj = _backward_local(tables, proj, windows_t, jnp.zeros((1,), jnp.int32), d_out, plan)
    else:

        def shard(tables_local, proj, windows_t, d_out):
            start = _shard_start(tables_local, plan)
            d_tab, d_proj = _backward_local(tables_local, proj, windows_t, start, d_out, plan)
            return d_tab, jax.lax.psum(d_proj, plan.rows_axis)

        rows = P(plan.rows_axis, None)
        d_tables, d_proj = jax.shard_map(
            shard, mesh=plan.mesh, in_specs=(rows, P(), P(), P()), out_specs=(rows, P()),
            axis_names=set(_axis_names(plan.rows_axis)), check_vma=False,
        )(tables, proj, windows_t, d_out)
    return d_tables, d_proj.astype(proj.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


# --- public entry point ------------------------------------------------------------------------------------


def _rows_sharding(mesh, rules):
    """(mesh, rows axis) to shard the table rows over, or (None, None): `mesh`, else the `jax.set_mesh` one,
    when the mesh axes `rules` gives the rows' logical name have a total size > 1.

    The rows axis is a PartitionSpec entry: "vp" under the default rules, None where the rules (or the mesh)
    leave the rows unsharded, a tuple where they shard them over several axes.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return None, None
    rows_axis = logical_to_spec(TABLE_AXES[:1], rules, mesh.axis_names)[0]
    return (mesh, rows_axis) if _shard_count(mesh, rows_axis) > 1 else (None, None)


def ngram_lookup(
    tables: jax.Array,
    proj: jax.Array,
    tokens: jax.Array,
    cfg: Config,
    history: jax.Array | None = None,
    *,
    impl: str = "auto",
    block_t: int = 32,
    block_d: int | None = None,
    mesh=None,
    rules=RULES,
) -> jax.Array:
    """sum_g P_g T[off_g + id_g]: the N-gram part of the input embedding, fused (see module docstring).

    Args:
      tables: [sum R_i, ngram_dim], all branch tables stacked by rows ("ngram_rows", "ngram_dim").
      proj: [G, ngram_dim, D] per-branch projections.
      tokens: int [B, T] token ids in [0, V).
      cfg: static Config with the N-gram embedding on.
      history: optional int [B, N-1], the previous N-1 tokens (see longcat_jax.model.ngram.next_history).
      impl: "auto" | "xla" | "pallas" (pallas_kernels/impl.py).
      block_t: tokens per kernel block (power of two >= 16; smaller inputs use one smaller block).
      block_d: output columns per kernel block (power of two dividing D); None = largest such <= 128
        (512 needs 272 KiB of shared memory on sm_90, over the 227 KiB limit; bench/triton_ptx.py).
      mesh: a mesh holding the rows axis ("vp" under the default rules); tables are sharded by rows over it
        when its size is > 1. None = the mesh set with `jax.set_mesh`, if any. Sum R_i must be divisible by
        the rows axis' size.
      rules: the logical-to-mesh rules table (sharding/rules.py) that names the rows axis; pass the table the
        tables were placed by.
    Returns:
      [B, T, D] in cfg.jnp_dtype; differentiable in tables and proj.
    """
    impl = resolve(impl, partitions_itself=True)
    if not cfg.ngram_n:
        raise ValueError("N-gram embedding is off (ngram_n = 0); nothing to look up")
    G, dim, total_rows = cfg.ngram_branches, cfg.ngram_dim, sum(cfg.ngram_table_rows)
    if tables.shape != (total_rows, dim):
        raise ValueError(f"tables must be [sum R_i, ngram_dim] = {(total_rows, dim)}, got {tables.shape}")
    if proj.ndim != 3 or proj.shape[:2] != (G, dim):
        raise ValueError(f"proj must be [G, ngram_dim, D] = ({G}, {dim}, D), got {proj.shape}")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer [B, T] array, got {tokens.dtype} {tokens.shape}")
    if total_rows >= 2**31:
        raise ValueError("concatenated N-gram table has >= 2**31 rows; int32 row ids would overflow")
    D = proj.shape[2]
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    if block_d is None:
        block_d = next((b for b in (128, 64, 32, 16) if D % b == 0), D)
    elif block_d < 1 or block_d & (block_d - 1) or D % block_d:
        raise ValueError(f"block_d must be a power of two dividing D = {D}, got {block_d}")
    rows_mesh, rows_axis = _rows_sharding(mesh, rules)
    if rows_mesh is not None:
        shards = _shard_count(rows_mesh, rows_axis)
        if total_rows % shards:
            raise ValueError(f"{total_rows} table rows do not split evenly over {rows_axis} = {shards}")

    B, T = tokens.shape
    windows = segment_windows(tokens, history, cfg)  # [B, T, N] uint32; raises on a bad history shape
    windows_t = windows.reshape(B * T, cfg.ngram_n).T  # [N, B*T]: contiguous per-column loads in the kernel
    block_t = min(block_t, max(16, int(pl.next_power_of_2(B * T))))
    plan = _Plan(cfg=cfg, impl=impl, block_t=block_t, block_d=block_d, mesh=rows_mesh, rows_axis=rows_axis)
    return _lookup(tables, proj, windows_t, plan).reshape(B, T, D)
