"""Shared building blocks: parameter creation, RMSNorm, SwiGLU MLP, RoPE with DeepSeek-YaRN
(docs/architecture.md#rmsnorm and docs/architecture.md#rope).

Dimension letters used in einsums across the package:
  B batch, T query length, S key length, D model width, F FFN width, N query heads, H head dim,
  R latent (LoRA) rank, E experts, C expert capacity, V vocab, L layers, G N-gram branches,
  I indexer heads, J indexer head dim, K top-k slots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from pallas_kernels.cpu_serving import compute_weight, matmul

INIT_STD = 0.02  # HF `initializer_range`; docs/architecture.md#init


def param(rngs: nnx.Rngs | None, shape, names: tuple, dtype, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names (sharding/rules.py resolves them to mesh axes)."""
    assert len(names) == len(shape), (shape, names)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (INIT_STD * _normal(rngs.params(), tuple(shape))).astype(dtype)
    return nnx.Param(value, out_sharding=names)


def _normal(key, shape) -> jax.Array:
    """Standard normal samples. Small tensors draw from a power-of-two sized vector and reshape, so eager
    construction compiles one sampler per size bucket instead of one per shape (seconds saved per model
    build); large tensors are drawn in their own shape so sharded initialisation stays local."""
    n = math.prod(shape)
    if n >= 1 << 20:
        return jax.random.normal(key, shape, jnp.float32)
    bucket = 1 << max(n - 1, 1).bit_length()
    return jax.random.normal(key, (bucket,), jnp.float32)[:n].reshape(shape)


# --- RMSNorm -----------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in f32, cast back to the input dtype, then scale (HF order, docs/architecture.md#rmsnorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: Config, names=("embed",)):
        self.weight = param(None, (dim,), names, cfg.jnp_param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


# --- SwiGLU MLP --------------------------------------------------------------------------------------------


def swiglu(x, w_gate, w_up, w_down):
    """down(SiLU(gate x) * up x); x [..., D], w_gate/w_up [D, F], w_down [F, D], computed in x's dtype."""
    w_gate, w_up, w_down = (compute_weight(w, x.dtype) for w in (w_gate, w_up, w_down))
    y = _swiglu(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def expert_swiglu(x, w_gate, w_up, w_down):
    """`swiglu` per expert: x [E, C, D], w_gate/w_up [E, D, F], w_down [E, F, D] -> [E, C, D],
    in x's dtype."""
    dt = x.dtype
    return _swiglu(x, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))


def swiglu_backward(g, u, w_gate, w_up, w_down, dy):
    """The backward of down(silu(g) * u) with g = x @ w_gate, u = x @ w_up, short of the weight gradients.

    Returns (dx, dg, du, a): the weight gradients are x.T @ dg, x.T @ du and a.T @ dy (a = silu(g) * u), left
    to the caller, which may accumulate them per expert (`expert_tiles`). One sigmoid gives silu and its
    derivative sigmoid(g) (1 + g (1 - sigmoid(g))).
    """
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = dy @ w_down.mT
    dg, du = dh * u * (sig * (1 + g * (1 - sig))), dh * silu
    return dg @ w_gate.mT + du @ w_up.mT, dg, du, silu * u


# The backward is written out: JAX's own derivative of the same forward ran 1.5x slower on XLA:CPU (the
# `small` MLP's forward + backward, 109.5 ms against 71.9 ms; bench/swiglu.py). Differentiating silu through
# its primitives left several elementwise passes, and XLA materialised transposed copies of the [M, F]
# gradients for the weight-gradient matmuls. Here every matmul reads its operands as they are (x.T @ dg and
# friends). M is every leading dimension of x flattened (batch and tokens), or an expert's capacity rows.
@jax.custom_vjp
def _swiglu(x, w_gate, w_up, w_down):
    """x [M, D] with weights [D, F] / [F, D], or x [E, M, D] with per-expert weights [E, D, F] / [E, F, D]."""
    return _swiglu_fwd(x, w_gate, w_up, w_down)[0]


def _swiglu_fwd(x, w_gate, w_up, w_down):
    dot = matmul if w_gate.ndim == 2 else jnp.matmul  # per-expert weights: a batched matmul
    g, u = dot(x, w_gate), dot(x, w_up)
    return dot(jax.nn.silu(g) * u, w_down), (x, w_gate, w_up, w_down, g, u)


def _swiglu_bwd(res, dy):
    x, w_gate, w_up, w_down, g, u = res
    dx, dg, du, a = swiglu_backward(g, u, w_gate, w_up, w_down, dy)
    return dx, x.mT @ dg, x.mT @ du, a.mT @ dy


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: Config, ffn: int, rngs: nnx.Rngs):
        pd, D = cfg.jnp_param_dtype, cfg.hidden_size
        self.w_gate = param(rngs, (D, ffn), ("embed", "mlp"), pd)
        self.w_up = param(rngs, (D, ffn), ("embed", "mlp"), pd)
        self.w_down = param(rngs, (ffn, D), ("mlp", "embed"), pd)

    def __call__(self, x):
        return swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])


# --- RoPE ------------------------------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float, factor: float = 1.0, original_max: int = 8192,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> jax.Array:
    """Inverse frequencies [dim/2] with DeepSeek-YaRN blending when factor > 1 (docs/architecture.md#rope)."""
    inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if factor <= 1.0:
        return inv

    def corr(rot):
        return dim * math.log(original_max / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # DeepSeek's guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    return inv * (1.0 - ramp) + inv / factor * ramp


def config_inv_freq(cfg: Config) -> jax.Array:
    return rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor,
                         cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate the last axis of x [B, T, ..., d] at integer positions [B, T].

    interleaved: pairs (x0, x1), (x2, x3), ...; the result is written de-interleaved, [rot(even) | rot(odd)],
    exactly as HF LongCat-Flash does. Scores are unchanged because q and k share the layout.
    half-split: pairs (x_i, x_{i+d/2}) (DeepSeek-V3.2 HF indexer).
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    extra = x.ndim - freqs.ndim
    freqs = freqs.reshape(freqs.shape[:2] + (1,) * extra + freqs.shape[2:])
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
