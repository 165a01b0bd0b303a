"""The train step's knobs without a train.py run: gradient accumulation (the micro-batches' mean gradient
equals the whole batch's), bf16 compute (it trains), and the model FLOPs behind the MFU figure."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import longcat_jax as lj
from longcat_jax.training.model_flops import active_matmul_params, step_flops
from longcat_jax.training.train_step import LossSettings, accumulated_grads, compute_loss
from tests.helpers import rel_err

# One layer keeps the compiles short; the indexer, MTP and N-gram stay on, so every loss term is covered.
CFG = lj.Config.tiny(num_layers=1, hi_enabled=False)


def _batch(seed, rows=4, length=24):
    rng = np.random.RandomState(seed)
    inputs = rng.randint(3, CFG.vocab_size, (rows, length)).astype(np.int32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "loss_mask": np.ones((rows, length), np.float32)}


def test_accumulated_gradients_equal_the_whole_batch():
    """4 rows as 1 or 2 micro-batches (equal target counts): the same gradients, terms and expert loads. The
    balance loss, a product of batch means, is the one term that differs per micro-batch, so it is off."""
    graphdef, params = nnx.split(lj.build_model(CFG, seed=0))
    settings = LossSettings(balance_weight=0.0)
    grads = jax.jit(functools.partial(accumulated_grads, graphdef=graphdef, cfg=CFG, settings=settings),
                    static_argnums=2)
    batch = _batch(0)
    g1, (t1, load1, _) = grads(params, batch, 1)
    g2, (t2, load2, _) = grads(params, batch, 2)
    np.testing.assert_array_equal(load1, load2)
    for k in ("ce", "mtp", "indexer_kl", "z_loss"):
        np.testing.assert_allclose(t1[k], t2[k], rtol=1e-4, atol=1e-7, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2), strict=True):
        assert rel_err(a, b) < 1e-4, jax.tree_util.keystr(path)


def test_bf16_compute_trains():
    """--dtype bfloat16: activations in bf16, parameters f32; ten AdamW steps on one batch cut the loss."""
    cfg = CFG.replace(dtype="bfloat16")
    graphdef, params = nnx.split(lj.build_model(cfg, seed=0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    opt = optax.adamw(3e-3)
    batch = _batch(1)

    @jax.jit
    def step(params, opt_state):
        (loss, _), g = jax.value_and_grad(compute_loss, has_aux=True)(params, graphdef, batch, cfg,
                                                                       LossSettings())
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = opt.init(params)
    losses = []
    for _ in range(10):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_model_flops_count_each_matmul_weight_a_token_touches():
    """The MFU numerator, against the closed form for a model without MTP, indexer or N-gram: attention
    projections, dense MLPs, router, the real experts' share of the experts, and the LM head."""
    cfg = lj.Config.small(ngram_n=0, use_indexer=False, si_enabled=False, hi_enabled=False, mtp_num_steps=0)
    _, params = nnx.split(lj.abstract_model(cfg))
    n, hq = cfg.num_heads, cfg.qk_head_dim
    mla = (cfg.hidden_size * cfg.q_lora_rank + cfg.q_lora_rank * n * hq
           + cfg.hidden_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
           + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
           + n * cfg.v_head_dim * cfg.hidden_size)
    real = cfg.moe_topk * cfg.n_routed_experts / cfg.num_slots
    layer = (2 * mla + 2 * 3 * cfg.hidden_size * cfg.ffn_hidden_size + cfg.hidden_size * cfg.num_slots
             + real * 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size)
    active = cfg.num_layers * layer + cfg.hidden_size * cfg.vocab_size
    assert active_matmul_params(cfg, params) == pytest.approx(active, rel=1e-12)
    tokens = 2 * 256
    attention = 6 * tokens * cfg.num_sublayers * n * 256 * (hq + cfg.v_head_dim)  # every key: no indexer
    expected = 6 * tokens * active + attention
    assert step_flops(cfg, params, 2, 256, sparse=True) == pytest.approx(expected, rel=1e-12)
    # MTP depths run the MTP module and the LM head once more each.
    deeper = cfg.replace(mtp_num_steps=2)
    _, p2 = nnx.split(lj.abstract_model(deeper))
    assert active_matmul_params(deeper, p2) > active + 2 * cfg.hidden_size * cfg.vocab_size
