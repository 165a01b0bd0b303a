"""Parity with transformers' LongcatFlashForCausalLM, through the same load_hf path real checkpoints use."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import longcat_jax as lj
from longcat_jax.model.block import Context
from longcat_jax.model.layers import config_inv_freq
from longcat_jax.model.moe import route
from tests.helpers import rel_err
from tests.hf_reference import causal_mask, layer_of, random_flash

YARN = dict(
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
    # transformers replaces `factor` by max_position / original_max when both are set
    # (docs/architecture.md#rope): keep them equal.
    max_position_embeddings=128,
)


@pytest.fixture(scope="module", params=["plain", "yarn"])
def pair(request, tmp_path_factory):
    ref = random_flash(seed=0, **(YARN if request.param == "yarn" else {}))
    path = tmp_path_factory.mktemp(f"flash_{request.param}")
    ref.save_pretrained(path)
    # HF's MLA latent norms use the RMSNorm class default eps 1e-6 (docs/architecture.md#rmsnorm).
    cfg, model = lj.load_hf(str(path), mla_norm_eps=1e-6)
    return ref, cfg, model


@pytest.mark.parametrize("batch,length", [(2, 1), (2, 7), (3, 24)])
def test_logits_match(pair, batch, length):
    ref, cfg, model = pair
    ids = np.random.RandomState(length).randint(0, cfg.vocab_size, (batch, length))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), expected) < 1e-4


def _hidden(cfg, batch=2, length=9, seed=1):
    x = np.random.RandomState(seed).randn(batch, length, cfg.hidden_size).astype(np.float32)
    pos = np.broadcast_to(np.arange(length), (batch, length))
    return x, pos


def test_yarn_config_read(pair):
    ref, cfg, _ = pair
    if "factor" in ref.config.rope_parameters:
        assert cfg.rope_factor == 4.0 and cfg.rope_original_max_position == 32
        assert cfg.softmax_scale == pytest.approx(ref.model.layers[0].self_attn[0].scaling, rel=1e-6)


def test_mla_sublayer_matches(pair):
    ref, cfg, model = pair
    x, pos = _hidden(cfg)
    hf_layer = ref.model.layers[1]
    with torch.no_grad():
        pe = ref.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
        expected, _ = hf_layer.self_attn[1](torch.tensor(x), position_embeddings=pe,
                                            attention_mask=causal_mask(x.shape[1]))
    attn = layer_of(model, 1).attn1
    q_nope, q_rope, _, c_kv, k_rope = attn.latents(jnp.asarray(x), jnp.asarray(pos), config_inv_freq(cfg))
    mask = jnp.asarray(pos[:, None, :] <= pos[:, :, None])
    for absorbed in (False, True):
        got, _ = attn.attend(q_nope, q_rope, c_kv, k_rope, mask, absorbed=absorbed)
        assert rel_err(got, expected.numpy()) < 1e-5


def test_decoder_layer_matches(pair):
    ref, cfg, model = pair
    x, pos = _hidden(cfg, seed=2)
    with torch.no_grad():
        pe = ref.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
        expected = ref.model.layers[0](torch.tensor(x), attention_mask=causal_mask(x.shape[1]),
                                       position_ids=torch.tensor(pos), position_embeddings=pe)
    ctx = Context(positions=jnp.asarray(pos), inv_freq=config_inv_freq(cfg))
    got, _, _ = layer_of(model, 0)(jnp.asarray(x), ctx)
    assert rel_err(got, expected.numpy()) < 1e-5


def test_router_and_moe_match(pair):
    ref, cfg, model = pair
    u, _ = _hidden(cfg, batch=4, length=16, seed=3)
    hf_moe = ref.model.layers[1].mlp
    layer = layer_of(model, 1)
    with torch.no_grad():
        _, hf_w, hf_idx = hf_moe.router(torch.tensor(u))
        expected = hf_moe(torch.tensor(u)).numpy()
    w, idx, _ = route(jnp.asarray(u.reshape(-1, cfg.hidden_size)), layer.moe.classifier[...],
                      layer.moe.bias[...], cfg)
    order_hf, order = np.argsort(hf_idx.numpy(), -1), np.argsort(np.asarray(idx), -1)
    np.testing.assert_array_equal(np.take_along_axis(hf_idx.numpy(), order_hf, -1),
                                  np.take_along_axis(np.asarray(idx), order, -1))
    np.testing.assert_allclose(np.take_along_axis(hf_w.numpy(), order_hf, -1),
                               np.take_along_axis(np.asarray(w), order, -1), rtol=1e-5)
    assert (np.asarray(idx) >= cfg.n_routed_experts).any(), "no token reached a zero expert; test is too weak"
    assert rel_err(layer.moe(jnp.asarray(u)), expected) < 1e-5
