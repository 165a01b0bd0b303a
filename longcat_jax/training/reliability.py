"""Training reliability: loss-spike/NaN guard, ABFT-checked matmuls, replica fingerprints, fault injection.

The LongCat blog claims bitwise determinism and bit-flip detection but leaves the mechanisms unpublished, so
these are our design choices (docs/architecture.md#reliability):

- Guard: a step whose loss or gradient norm is NaN/Inf, or whose loss spikes far above the running
  loss EMA, is skipped (`select_tree` keeps the old params and optimizer state); after N consecutive
  bad steps the trainer restores the last good checkpoint (`needs_restore`).
- Algorithm-based fault tolerance (Huang & Abraham, IEEE TC 1984): y = x @ w is checked against a
  column checksum, sum_j y[..., j] == x @ (sum_j w[:, j]), with a tolerance scaled by the magnitudes
  |x| @ (sum_j |w[:, j]|) so rounding never trips it while a flipped high bit does.
- Replica fingerprint: an exact, order-fixed uint32 hash of the parameter bits, computed by every
  data-parallel replica on its OWN buffers, so a replica whose copy silently diverged stands out.
- Fault injection (`--inject-fault nan-grad@STEP | bitflip@STEP`) for tests.

Everything is pure and jittable except the host-side helpers `needs_restore`, `odd_replicas`,
`parse_fault`, `flip_bit_on_device` and `replica_fingerprints` (which compiles and runs its own jitted
shard_map, because it must see the concrete shardings of its inputs).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# ---------------------------------------------------------------------------------------------- guard


@flax.struct.dataclass
class GuardState:
    """Running statistics of the loss guard (a pytree of scalars, so it lives in the train state).

    loss_ema: f32[] EMA of the loss over good steps only.
    good_steps: i32[] number of good (applied) steps seen.
    consecutive_bad: i32[] bad steps since the last good one.
    total_skipped: i32[] bad steps over the whole run.
    """

    loss_ema: jax.Array
    good_steps: jax.Array
    consecutive_bad: jax.Array
    total_skipped: jax.Array


def init_guard() -> GuardState:
    """A fresh guard: no good steps seen yet, so the spike test is off until `warmup` good steps."""
    zero = jnp.zeros((), jnp.int32)
    return GuardState(loss_ema=jnp.zeros((), jnp.float32), good_steps=zero, consecutive_bad=zero,
                      total_skipped=zero)


def guard_check(state: GuardState, loss, grad_norm, spike_factor: float = 3.0, warmup: int = 20,
                ema: float = 0.99) -> tuple[jax.Array, GuardState]:
    """Decide whether this step's update may be applied, and update the guard statistics.

    A step is bad when `loss` or `grad_norm` is NaN/Inf, or, once `warmup` good steps have been seen,
    when loss - loss_ema > (spike_factor - 1) * |loss_ema| (i.e. loss > spike_factor * loss_ema for the
    usual positive loss). Bad steps leave the EMA and `good_steps` untouched, so a run of spikes cannot
    drag the reference up and then pass.

    Args:
      state: the guard state from the previous step.
      loss: scalar loss of this step (any float dtype).
      grad_norm: scalar global gradient norm of this step.
      spike_factor: how many times the running loss counts as a spike (> 1).
      warmup: good steps before the spike test is switched on.
      ema: EMA decay in [0, 1).
    Returns:
      (ok: bool[], new_state). The first good step sets the EMA to its loss.
    """
    loss = jnp.asarray(loss, jnp.float32)
    grad_norm = jnp.asarray(grad_norm, jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ref = state.loss_ema
    spike = (state.good_steps >= warmup) & (loss - ref > (spike_factor - 1.0) * jnp.abs(ref))
    ok = finite & ~spike
    blended = jnp.where(state.good_steps == 0, loss, ema * ref + (1.0 - ema) * loss)
    bad = (~ok).astype(jnp.int32)
    new = GuardState(
        loss_ema=jnp.where(ok, blended, ref),
        good_steps=state.good_steps + ok.astype(jnp.int32),
        consecutive_bad=jnp.where(ok, 0, state.consecutive_bad + 1),
        total_skipped=state.total_skipped + bad,
    )
    return ok, new


def select_tree(ok, new_tree, old_tree):
    """Leafwise `where(ok, new, old)`: keep the old params/optimizer state when the step is bad.

    Args:
      ok: bool[] (traced is fine).
      new_tree, old_tree: pytrees of identical structure, shapes and dtypes.
    Returns:
      a pytree like `new_tree`.
    """
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_tree, old_tree)


def needs_restore(state: GuardState, max_consecutive: int) -> bool:
    """Host-side: True once `max_consecutive` bad steps happened in a row (restore last good ckpt)."""
    if max_consecutive < 1:
        raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
    return int(state.consecutive_bad) >= max_consecutive


# ----------------------------------------------------------------------------------------------- ABFT


def flip_bit(x, flat_index, bit):
    """Flip one bit of one element: bitcast to the same-width uint, xor, bitcast back.

    Args:
      x: array of any 8/16/32/64-bit dtype.
      flat_index: int index into x.ravel() (may be traced).
      bit: bit position, 0 = least significant (for f32: 31 sign, 30..23 exponent, 22..0 mantissa).
    Returns:
      array like x with that one bit flipped.
    """
    x = jnp.asarray(x)
    nbits = x.dtype.itemsize * 8
    if isinstance(bit, (int, np.integer)) and not 0 <= bit < nbits:
        raise ValueError(f"bit {bit} out of range for {x.dtype} ({nbits} bits)")
    if isinstance(flat_index, (int, np.integer)) and not 0 <= flat_index < x.size:
        raise ValueError(f"flat_index {flat_index} out of range for an array of {x.size} elements")
    utype = jnp.dtype(f"uint{nbits}")
    u = jax.lax.bitcast_convert_type(x, utype).reshape(-1)
    mask = jnp.left_shift(jnp.asarray(1, utype), jnp.asarray(bit, utype))
    u = u.at[flat_index].set(u[flat_index] ^ mask)
    return jax.lax.bitcast_convert_type(u.reshape(x.shape), x.dtype)


def weight_checksum(w) -> tuple[jax.Array, jax.Array]:
    """Row sums of w in f32: (sum_j w[:, j], sum_j |w[:, j]|), each [K]. Take these when w is known
    good (e.g. right after the optimizer update) to also catch corruption of w before its use."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    return w32.sum(-1), jnp.abs(w32).sum(-1)


# Matmul rounding relative to the magnitude |x| @ |w|.sum(-1). Exact products (16-bit inputs, or f32 at
# full precision) leave only f32 accumulation error: measured <= 2e-7 on random and all-positive data;
# 2**-15 keeps a wide margin yet still sees the loss of one large element of y in a [., 2048]x[2048, 1024]
# matmul. Where the backend may round f32 inputs to tf32/bf16 (GPU/TPU default precision) the rigorous
# bound is 2 * u_in = 2**-8 for bf16 passes; 2**-7 covers it.
RTOL_EXACT_PRODUCTS = 2.0**-15
RTOL_REDUCED_PRECISION = 2.0**-7


def default_rtol(x_dtype, w_dtype, precision=None) -> float:
    """The ABFT tolerance for a matmul of these input dtypes on the default backend (see above)."""
    narrow = all(jnp.dtype(d).itemsize <= 2 for d in (x_dtype, w_dtype))
    full = precision in (jax.lax.Precision.HIGHEST, "highest", "float32") or (
        precision is None and jax.config.jax_default_matmul_precision in ("highest", "float32"))
    exact = narrow or full or jax.default_backend() == "cpu"
    return RTOL_EXACT_PRODUCTS if exact else RTOL_REDUCED_PRECISION


def abft_check(x, y, checksum, *, rtol: float | None = None) -> jax.Array:
    """Verify y == x @ w using only w's checksum.

    Per row r: |sum_j y[r, j] - x[r] . wsum| <= rtol * |x[r]| . wabs + eps(y) / 2 * sum_j |y[r, j]|.
    The first term covers matmul rounding (see `default_rtol`); the second is the exact bound for
    rounding y to its own dtype (bf16 outputs). NaN/Inf anywhere is a mismatch.

    Args:
      x: [..., K] matmul input.
      y: [..., M] the result to verify.
      checksum: (wsum [K], wabs [K]) from `weight_checksum`.
      rtol: tolerance relative to the magnitude |x| @ |w|.sum(-1); default `default_rtol(x, y)`.
    Returns:
      mismatch: bool[], True if any row fails.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    rtol = default_rtol(x.dtype, y.dtype) if rtol is None else rtol
    wsum, wabs = checksum
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # the checksum matvec is cheap; keep it free of tf32/bf16 passes
    expect = jnp.matmul(x32, wsum, precision=hi)  # [...]
    mag = jnp.matmul(jnp.abs(x32), wabs, precision=hi)  # [...]
    out_eps = float(jnp.finfo(y.dtype).eps) / 2 if jnp.issubdtype(y.dtype, jnp.floating) else 0.0
    tol = rtol * mag + out_eps * jnp.abs(y32).sum(-1)
    # `not <=` rather than `>` so that NaN (from Inf - Inf or a NaN bit pattern) counts as a mismatch.
    return jnp.any(~(jnp.abs(y32.sum(-1) - expect) <= tol))


def abft_matmul(x, w, *, rtol: float | None = None, checksum=None, precision=None):
    """y = x @ w (f32 accumulation, result in the inputs' dtype) plus its ABFT verdict.

    Args:
      x: [..., K].
      w: [K, M].
      rtol: see `abft_check`; default `default_rtol(x.dtype, w.dtype, precision)`.
      checksum: optional precomputed `weight_checksum(w)`; by default computed from w itself.
      precision: passed to the main matmul.
    Returns:
      (y [..., M], mismatch bool[]).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"abft_matmul needs x [..., K] and w [K, M]; got {x.shape} and {w.shape}")
    rtol = default_rtol(x.dtype, w.dtype, precision) if rtol is None else rtol
    y = jnp.matmul(x, w, precision=precision, preferred_element_type=jnp.float32)
    y = y.astype(jnp.result_type(x, w))
    return y, abft_check(x, y, weight_checksum(w) if checksum is None else checksum, rtol=rtol)


# -------------------------------------------------------------------------------------- fingerprints

_GOLDEN = 0x9E3779B9  # odd; 2**32 / golden ratio


def _mix32(h):
    """murmur3 fmix32: a bijection on uint32 that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(path, x) -> jax.Array:
    """The exact bit pattern of a leaf as a flat uint32 vector (16/8-bit types widened, 64-bit split)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"fingerprint: complex leaf at {jax.tree_util.keystr(path)} is not supported")
    nbits = x.dtype.itemsize * 8
    if nbits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{nbits}")).astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 64-bit gets a trailing [2]


def fingerprint(tree) -> jax.Array:
    """Exact, order-fixed uint32 hash of every bit of every leaf.

    Each word is salted with its position and mixed (bijectively), then summed mod 2**32: integer
    addition is associative, so the result does not depend on XLA's reduction order, and a change in
    any single word always changes the sum. Leaves are chained in pytree path order with a step that
    is bijective in both the running hash and the leaf hash.

    Args:
      tree: pytree of arrays.
    Returns:
      uint32[].
    """
    h = jnp.uint32(0)
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        words = _words(path, leaf)
        pos = jnp.arange(words.size, dtype=jnp.uint32)
        leaf_h = jnp.sum(_mix32(words + pos * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
        h = _mix32((h ^ leaf_h) + jnp.uint32((_GOLDEN * (i + 1)) % 2**32))
    return h


def _spec_of(path, leaf, mesh, axis):
    sharding = getattr(leaf, "sharding", None)
    where = jax.tree_util.keystr(path) or "<root>"
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"replica_fingerprints: leaf {where} has sharding {sharding!r}; put it on the "
                        "mesh with a NamedSharding first")
    if sharding.mesh != mesh:
        raise ValueError(f"replica_fingerprints: leaf {where} lives on mesh {dict(sharding.mesh.shape)}, "
                         f"not on {dict(mesh.shape)}")
    used = {a for e in sharding.spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    if axis in used:
        raise ValueError(f"replica_fingerprints: leaf {where} is sharded over {axis!r} "
                         f"(spec {sharding.spec}), so replicas hold different data; pass replicated leaves")
    return sharding.spec


def replica_fingerprints(tree, mesh: jax.sharding.Mesh, axis: str = "dp") -> jax.Array:
    """Fingerprint of each replica's OWN copy of `tree` along mesh axis `axis`.

    Each device hashes its local buffers inside a shard_map whose in_specs equal the leaves' own
    shardings (so nothing is resharded or deduplicated); check_vma is off because we deliberately do
    not trust the "replicated" claim. The per-device hashes of one replica (its devices along the
    other mesh axes) are chained in mesh order.

    Args:
      tree: pytree of jax.Arrays with NamedShardings on `mesh`, none sharded over `axis`.
      mesh: the device mesh.
      axis: the replica axis.
    Returns:
      uint32[mesh.shape[axis]]; equal entries mean bit-identical replicas.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; mesh axes: {mesh.axis_names}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = tuple(_spec_of(p, x, mesh, axis) for p, x in flat)
    return _replica_fn(mesh, axis, treedef, specs)(tree)


@functools.lru_cache(maxsize=32)
def _replica_fn(mesh, axis, treedef, specs):
    """The jitted per-replica fingerprint for one mesh/tree layout (cached: the trainer calls it often)."""
    names = tuple(mesh.axis_names)

    def local(t):
        return fingerprint(t).reshape((1,) * len(names))

    per_device_fn = jax.shard_map(local, mesh=mesh, in_specs=(jax.tree.unflatten(treedef, specs),),
                                  out_specs=P(*names), check_vma=False)

    def run(tree):
        per_device = per_device_fn(tree)  # [*mesh.shape]
        per_device = jnp.moveaxis(per_device, names.index(axis), 0).reshape(mesh.shape[axis], -1)
        h = jnp.zeros((mesh.shape[axis],), jnp.uint32)
        for j in range(per_device.shape[1]):  # chain the devices of one replica in mesh order
            h = _mix32((h ^ per_device[:, j]) + jnp.uint32((_GOLDEN * (j + 1)) % 2**32))
        return h

    return jax.jit(run)


def fingerprint_mismatch(fps) -> jax.Array:
    """bool[]: True if the replica fingerprints uint32[R] are not all equal."""
    fps = jnp.asarray(fps)
    return jnp.any(fps != fps[0])


def odd_replicas(fps) -> list[int]:
    """Host-side: indices of replicas that disagree with the strict majority fingerprint; all indices
    if there is a mismatch but no strict majority (e.g. 2 replicas), [] if all agree."""
    fps = np.asarray(fps)
    values, counts = np.unique(fps, return_counts=True)
    if len(values) == 1:
        return []
    if counts.max() * 2 <= len(fps):
        return list(range(len(fps)))
    return [int(i) for i in np.flatnonzero(fps != values[counts.argmax()])]


# ----------------------------------------------------------------------------------- fault injection


class Fault(NamedTuple):
    """A fault to inject: kind is 'nan-grad' or 'bitflip'; step is the (0-based) train step."""

    kind: str
    step: int


FAULT_KINDS = ("nan-grad", "bitflip")


def parse_fault(spec: str) -> Fault:
    """Parse '--inject-fault' text such as 'nan-grad@12' or 'bitflip@3'; anything else is a ValueError."""
    m = re.fullmatch(r"([a-z-]+)@(\d+)", spec.strip()) if isinstance(spec, str) else None
    if m is None or m.group(1) not in FAULT_KINDS:
        raise ValueError(f"bad fault spec {spec!r}: expected KIND@STEP with KIND one of "
                         f"{', '.join(FAULT_KINDS)} and STEP a non-negative integer (e.g. nan-grad@10)")
    return Fault(m.group(1), int(m.group(2)))


def _first_float_leaf(tree) -> int:
    leaves = jax.tree.leaves(tree)
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) and jnp.size(leaf) > 0:
            return i
    raise ValueError("no non-empty floating-point leaf to inject a fault into")


def inject_nan(tree, where=True):
    """Set element 0 of the first floating-point leaf to NaN (if `where`, which may be traced)."""
    leaves, treedef = jax.tree.flatten(tree)
    i = _first_float_leaf(tree)
    x = jnp.asarray(leaves[i])
    flat = x.reshape(-1)
    leaves[i] = flat.at[0].set(jnp.where(where, jnp.nan, flat[0])).reshape(x.shape)
    return jax.tree.unflatten(treedef, leaves)


def high_bit(dtype) -> int:
    """The top exponent bit of a float dtype (30 for f32, 14 for bf16/f16): flipping it on a value with
    |v| < 2 multiplies it by a huge power of two."""
    return jnp.dtype(dtype).itemsize * 8 - 2


def inject_bitflip(tree, where=True, *, flat_index: int = 0, bit: int | None = None):
    """Flip bit `bit` (default: the top exponent bit) of element `flat_index` of the first floating-point
    leaf, if `where` (may be traced). Deterministic, so tests know exactly what changed."""
    leaves, treedef = jax.tree.flatten(tree)
    i = _first_float_leaf(tree)
    x = jnp.asarray(leaves[i])
    flipped = flip_bit(x, flat_index, high_bit(x.dtype) if bit is None else bit)
    leaves[i] = jnp.where(where, flipped, x)
    return jax.tree.unflatten(treedef, leaves)


def flip_bit_on_device(x: jax.Array, device, flat_index: int = 0, bit: int | None = None) -> jax.Array:
    """Host-side: a copy of the replicated jax.Array `x` in which only `device`'s buffer has one bit
    flipped: the silent divergence `replica_fingerprints` must catch. Built with
    jax.make_array_from_single_device_arrays, so JAX still believes the array is replicated."""
    if not x.sharding.is_fully_replicated:
        raise ValueError(f"flip_bit_on_device needs a fully replicated array, got {x.sharding}")
    bit = high_bit(x.dtype) if bit is None else bit
    bufs = []
    for shard in x.addressable_shards:
        data = shard.data
        if shard.device == device:
            data = jax.device_put(flip_bit(np.asarray(data), flat_index, bit), device)
        bufs.append(data)
    if device not in {s.device for s in x.addressable_shards}:
        raise ValueError(f"device {device} holds no shard of this array")
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, bufs)
