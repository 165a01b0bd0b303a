"""A 2-D contraction inside a kernel that Triton accepts at every power-of-two tile size.

Triton's `tl.dot` needs M, N and K >= 16, and a kernel's tile may be smaller (8 heads per program, a 4-token
block in a test). A small operand is widened to 16 by repeating it (the contracted axis with zeros in all
but the first copy), the dot runs on tensor cores, and the first copy of the result is kept: exact, since
the extra terms are zeros and the extra rows are copies. Other sizes fall back to a multiply and a sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_DOT = 16  # smallest M, N and K tl.dot takes


def _repeat(x, axis: int, copies: int, zero_extra: bool = False):
    """x [A, B] with `copies` copies of itself along `axis` (copy-major), the later ones zero if asked."""
    if copies == 1:
        return x
    A, B = x.shape
    if axis == 0:
        y = jnp.broadcast_to(x[None], (copies, A, B))
        copy = jax.lax.broadcasted_iota(jnp.int32, y.shape, 0)
    else:
        y = jnp.broadcast_to(x[:, None, :], (A, copies, B))
        copy = jax.lax.broadcasted_iota(jnp.int32, y.shape, 1)
    if zero_extra:
        y = jnp.where(copy == 0, y, jnp.zeros_like(y))
    return y.reshape((copies * A, B) if axis == 0 else (A, copies * B))


def _first_copy(x, axis: int, copies: int):
    """Inverse of `_repeat` on a result: copy 0 along `axis` (a masked sum, Triton has no slicing)."""
    if copies == 1:
        return x
    A, B = x.shape
    shape = (copies, A // copies, B) if axis == 0 else (A, copies, B // copies)
    y = x.reshape(shape)
    keep = jax.lax.broadcasted_iota(jnp.int32, shape, 0 if axis == 0 else 1) == 0
    return jnp.sum(jnp.where(keep, y, 0.0), axis=0 if axis == 0 else 1)


def _copies(n: int) -> int:
    return max(1, MIN_DOT // n)


def tile_dot(a, b, a_contract: int, b_contract: int, precision=None):
    """f32 [M, N] = sum_c a[.., c] b[.., c] over a's axis a_contract and b's axis b_contract (2-D arrays)."""
    a = a if a_contract == 1 else a.T
    b = b if b_contract == 1 else b.T
    (M, C), N = a.shape, b.shape[0]
    if any(n & (n - 1) for n in (M, N, C)):  # not a Triton tile; only reached in interpret mode
        return jnp.sum(a.astype(jnp.float32)[:, None, :] * b.astype(jnp.float32)[None, :, :], axis=2)
    rm, rn, rc = _copies(M), _copies(N), _copies(C)
    a = _repeat(_repeat(a, 1, rc, zero_extra=True), 0, rm)
    b = _repeat(_repeat(b, 1, rc), 0, rn)
    out = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)
    return _first_copy(_first_copy(out, 0, rm), 1, rn)


def einsum_2d(spec: str, a, b, precision=None):
    """`tile_dot` for an einsum spec with one contracted letter whose output is (a's free, b's free),
    e.g. "nr,kr->nk"; leading "..." (absent in a kernel's 2-D tiles) is ignored."""
    ins, out = spec.replace("...", "").split("->")
    sa, sb = ins.split(",")
    (c,) = set(sa) & set(sb)
    if out != sa.replace(c, "") + sb.replace(c, ""):
        raise ValueError(f"einsum_2d: {spec!r} does not give (a's free axis, b's free axis)")
    return tile_dot(a, b, sa.index(c), sb.index(c), precision)
