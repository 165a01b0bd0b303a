"""Presets, derived constants (docs/architecture.md#presets) and the inspect report (abstract shapes only)."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from longcat_jax import Config, abstract_model
from longcat_jax.inspect import param_report
from longcat_jax.model.layers import rms_norm, rope_inv_freq


def test_longcat2_derived_constants():
    cfg = Config.longcat_2()
    assert cfg.q_scale == pytest.approx(2.3094, abs=1e-4)
    assert cfg.kv_scale == pytest.approx(4.0)
    assert cfg.softmax_scale == pytest.approx(0.1578114, rel=1e-6)  # 192^-0.5 * mscale(120)^2
    assert cfg.ngram_branches == 16 and cfg.ngram_dim * cfg.ngram_branches == cfg.hidden_size
    assert cfg.ngram_table_rows[0] == 16_476_898 and cfg.ngram_table_rows[-1] == 16_476_928
    assert cfg.indexer_sublayers == 1 and cfg.num_sublayers == 76


def test_flash_scales():
    assert Config.longcat_flash().q_scale == pytest.approx(2.0)
    assert Config.longcat_flash().kv_scale == pytest.approx(3.4641, abs=1e-4)
    assert Config.longcat_flash().softmax_scale == pytest.approx(192**-0.5)
    assert Config.longcat_flash_lite().q_scale == pytest.approx(1.4142, abs=1e-4)


def test_yarn_ramp_matches_spec():
    """YaRN ramp (docs/architecture.md#rope): for LongCat-2.0 low = 8, high = 17;
    pairs <= 8 unchanged, pairs >= 17 divided by the factor."""
    plain = np.asarray(rope_inv_freq(64, 1e6))
    yarn = np.asarray(rope_inv_freq(64, 1e6, 120.0, 8192, 32.0, 1.0))
    np.testing.assert_allclose(yarn[:9], plain[:9], rtol=1e-6)
    np.testing.assert_allclose(yarn[17:], plain[17:] / 120.0, rtol=1e-6)
    assert np.all((yarn[9:17] < plain[9:17]) & (yarn[9:17] > plain[9:17] / 120.0))


def test_rms_norm_matches_hf():
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashRMSNorm

    x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32)
    ref = LongcatFlashRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 16))
        expected = ref(torch.tensor(x)).numpy()
    np.testing.assert_allclose(rms_norm(x, ref.weight.detach().numpy(), 1e-5), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(moe_topk=20), "exceeds"),
    (dict(cli_factor=3), "cli_factor"),
    (dict(ngram_n=1), "ngram_n"),
    (dict(index_init_tokens=8, index_local_tokens=8), "dynamic"),
    (dict(hi_block_size=8), "hi_block_size"),
    (dict(dtype="float12"), "float12"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Config.tiny(**bad)


@pytest.mark.parametrize("name", Config.PRESETS)
def test_every_preset_builds_abstractly(name):
    cfg = Config.preset(name)
    model = abstract_model(cfg)
    assert model.layers.attn0.w_q_up.shape == (cfg.num_layers, cfg.q_lora_rank, cfg.num_heads,
                                               cfg.qk_head_dim)
    assert model.layers.moe.w_down.shape == (cfg.num_layers, cfg.n_routed_experts, cfg.expert_ffn_hidden_size,
                                             cfg.hidden_size)
    assert (model.ngram is None) == (cfg.ngram_n == 0) and (model.mtp is None) == (cfg.mtp_num_steps == 0)
    assert isinstance(model.embed.get_value(), jax.ShapeDtypeStruct)


@pytest.mark.parametrize("name,total_b", [("longcat_flash", 560.7), ("longcat_flash_lite", 68.5),
                                          ("longcat_2", 1638.6)])
def test_published_totals_within_one_percent(name, total_b):
    assert math.isclose(param_report(Config.preset(name))["total_params"] / 1e9, total_b, rel_tol=0.01)


def test_longcat2_activation_and_cache():
    r = param_report(Config.longcat_2())
    # "~48B active" (docs/architecture.md#presets)
    assert math.isclose(r["active_params_avg"] / 1e9, 48.0, rel_tol=0.02)
    assert r["active_params_min"] < r["active_params_avg"] < r["active_params_max"]
    # 76 x 576 + 38 x 128 values in bf16 (docs/architecture.md#cache)
    assert r["kv_cache_bytes_per_token"] == 48_640 * 2
    assert math.isclose(r["ngram_table_params"] / 1e9, 134.98, rel_tol=1e-3)
    flash = param_report(Config.longcat_flash())
    assert math.isclose(flash["active_params_min"] / 1e9, 18.6, rel_tol=0.01)  # published 18.6-31.3B
    assert math.isclose(flash["active_params_max"] / 1e9, 31.3, rel_tol=0.01)


def test_small_preset_size():
    assert 100e6 <= param_report(Config.small())["total_params"] <= 300e6


def test_inspect_cli_json():
    out = subprocess.run([sys.executable, "-m", "longcat_jax.inspect", "--preset", "longcat_flash", "--json"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert {"total_params", "active_params_min", "active_params_avg", "active_params_max",
            "kv_cache_bytes_per_token"} <= set(report)
    bad = subprocess.run([sys.executable, "-m", "longcat_jax.inspect", "--preset", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
