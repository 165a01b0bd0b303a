"""The fused LM head (longcat_jax.training.lm_loss) against autodiff through the plain logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.training.lm_loss import lm_head_stats, stats_from_logits


def _loss(stats_fn, h, w, targets, mask):
    """CE + a z-loss term over masked positions: both cotangents of the statistics are non-trivial."""
    lse, target_logit = stats_fn(h, w, targets)
    return jnp.sum((lse - target_logit + 0.1 * lse**2) * mask) / mask.sum()


def _plain(h, w, targets):
    return stats_from_logits(jnp.einsum("btd,dv->btv", h, w), targets)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fused_head_matches_autodiff(dtype, tol):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 7, 16), jnp.float32).astype(dtype)
    w = (0.5 * jax.random.normal(kw, (16, 50), jnp.float32)).astype(dtype)
    targets = jax.random.randint(kt, (2, 7), 0, 50)
    mask = jnp.ones((2, 7)).at[1, 5:].set(0.0)
    ref = jax.value_and_grad(lambda h, w: _loss(_plain, h, w, targets, mask), argnums=(0, 1))(h, w)
    got = jax.value_and_grad(lambda h, w: _loss(lm_head_stats, h, w, targets, mask), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(got[0], ref[0], rtol=tol)
    for g, r in zip(got[1], ref[1]):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)
    # Masked positions get no gradient.
    assert not np.any(np.asarray(got[1][0][1, 5:], np.float32))
