"""Greedy generation through the prefill / decode-step cache path (one request batch, no sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longcat_jax.model.longcat import LongCat, decode_step, prefill


def generate(model: LongCat, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy continuation of prompt [B, T]; returns [B, max_new_tokens] token ids."""
    B, T = prompt.shape
    logits, cache = jax.jit(prefill, static_argnums=2)(model, prompt, T + max_new_tokens)
    step = jax.jit(decode_step)
    token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
    out = [token]
    for _ in range(max_new_tokens - 1):
        logits, cache = step(model, token, cache)
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
        out.append(token)
    return jnp.concatenate(out, axis=1)
