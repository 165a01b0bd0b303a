"""The per-device memory planner (longcat_jax/memory_plan.py): exact parameter, optimizer and KV-cache bytes
on small meshes against independent arithmetic, the verdict, its errors, and full-size plans from abstract
shapes only."""

import json
import math

import jax
import pytest
from flax import nnx

from longcat_jax import Config, abstract_model
from longcat_jax.inspect import main, param_report
from longcat_jax.memory_plan import PlanSettings, parse_bytes, plan_memory
from longcat_jax.training.optim import OptimizerSettings, make_optimizer, param_labels

TINY = Config.tiny()
F32 = PlanSettings(batch=2, seq_len=64, param_dtype="float32")


def _params():
    """{path: (shape, itemsize, logical names, optimizer label)} of the tiny model, read off its own state."""
    state = nnx.state(abstract_model(TINY))
    labels = dict(nnx.to_flat_state(param_labels(state)))
    return {".".join(map(str, p)): (v.get_value().shape, 4, tuple(v.get_metadata()["out_sharding"]),
                                    labels[p].get_value() if hasattr(labels[p], "get_value") else labels[p])
            for p, v in nnx.to_flat_state(state)}


PARAMS = _params()
FULL = sum(math.prod(shape) * size for shape, size, _, _ in PARAMS.values())


def _bytes(mesh_sizes, settings=F32, **kw):
    return plan_memory(TINY, mesh_sizes, settings, **kw)["per_device_bytes"]


def test_one_device_holds_every_parameter():
    assert _bytes({})["params"] == FULL
    assert _bytes({})["grads"] == FULL
    # the MTP block is in memory too, though published totals leave it out
    report = param_report(TINY)
    assert FULL == 4 * (report["total_params"] + report["mtp_params"])


def test_tp_halves_exactly_the_tp_sharded_tensors():
    tp_names = {"heads", "mlp", "expert_mlp", "vocab"}  # RULES maps these to tp
    halved = sum(math.prod(s) * b for s, b, names, _ in PARAMS.values() if tp_names & set(names))
    assert 0 < halved < FULL
    assert _bytes({"tp": 2})["params"] == FULL - halved // 2


def test_ep_halves_the_experts_and_nothing_else():
    experts = sum(math.prod(s) * b for p, (s, b, _, _) in PARAMS.items()
                  if p in ("layers.moe.w_gate", "layers.moe.w_up", "layers.moe.w_down"))
    plan = plan_memory(TINY, {"ep": 2}, F32)
    assert plan["per_device_bytes"]["params"] == FULL - experts // 2
    whole = plan_memory(TINY, {}, F32)["params_by_group"]
    assert {k: v for k, v in plan["params_by_group"].items() if v != whole[k]} == {
        "layers.moe": whole["layers.moe"] - experts // 2}


def test_optimizer_state_is_muon_momentum_and_adam_moments_then_zero1_over_dp():
    muon = sum(math.prod(s) * b for s, b, _, label in PARAMS.values() if label == "muon")
    adamw = sum(math.prod(s) * b for s, b, _, label in PARAMS.values() if label == "adamw")
    state = nnx.state(abstract_model(TINY))
    opt_state = jax.eval_shape(make_optimizer(OptimizerSettings(), state).init, state)
    # step counts and Muon's Newton-Schulz coefficients
    extras = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if x.size < 16)
    one = _bytes({})["optimizer"]
    assert one == muon + 2 * adamw + extras
    # ZeRO-1: every tiny moment has a free dimension divisible by 2, so dp=2 halves all of them
    dp2 = _bytes({"dp": 2})
    assert dp2["optimizer"] == (one - extras) // 2 + extras
    assert dp2["params"] == FULL  # parameters are not split over dp
    adam_only = _bytes({}, PlanSettings(batch=2, seq_len=64, optimizer="adamw"))["optimizer"]
    assert adam_only > one  # AdamW keeps two moments where Muon keeps one


def test_each_parameter_counts_in_its_own_dtype():
    """--param-dtype bfloat16 halves the parameters that follow it; the router stays f32 (the model's)."""
    bf16 = _bytes({}, PlanSettings(batch=2, seq_len=64, param_dtype="bfloat16"))
    model = abstract_model(TINY.replace(param_dtype="bfloat16"))
    expected = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))
    assert bf16["params"] == bf16["grads"] == expected
    assert FULL / 2 < expected < FULL
    assert bf16["optimizer"] < _bytes({})["optimizer"]


def test_activation_estimate_scales_with_tokens_and_remat():
    short = _bytes({}, PlanSettings(batch=2, seq_len=64))
    long = _bytes({}, PlanSettings(batch=2, seq_len=128))
    assert long["activations"] == 2 * short["activations"] and long["logits"] == 2 * short["logits"]
    full = _bytes({}, PlanSettings(batch=2, seq_len=64, remat="full"))
    assert 0 < full["activations"] < short["activations"]
    split = _bytes({"dp": 2}, PlanSettings(batch=2, seq_len=64))  # one sequence per device
    assert split["activations"] * 2 == short["activations"]


def test_kv_cache_is_exact_and_sharded_by_batch_and_context():
    settings = PlanSettings(mode="decode", batch=4, context=32)
    per_token = 2 * TINY.num_layers * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 2  # bf16 latent + rope
    per_token += TINY.num_layers * TINY.indexer_sublayers * TINY.index_head_dim * 4  # f32 indexer keys
    history = 4 * (TINY.ngram_n - 1) * 4  # int32 N-gram history per sequence
    one = plan_memory(TINY, {}, settings)
    assert one["per_device_bytes"]["kv_cache"] == 4 * 32 * per_token + history
    assert "grads" not in one["per_device_bytes"] and "optimizer" not in one["per_device_bytes"]
    split = plan_memory(TINY, {"dp": 2, "cp": 2}, settings)["per_device_bytes"]["kv_cache"]
    assert split == (4 * 32 * per_token) // 4 + history // 2  # batch over dp, context over cp


def test_verdict_and_margin():
    total = _bytes({})["total"]
    fits = plan_memory(TINY, {}, F32, device_memory=total)
    assert fits["fits"] and fits["margin_bytes"] == 0
    short = plan_memory(TINY, {}, F32, device_memory=total - 1)
    assert not short["fits"] and short["margin_bytes"] == -1


@pytest.mark.parametrize("text,n", [("64GiB", 64 * 2**30), ("141GB", 141 * 10**9), ("512 MiB", 512 * 2**20),
                                    ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["64 gigs", "GiB", "-3GB", "0GB", ""])
def test_parse_bytes_rejects_in_one_line(text):
    with pytest.raises(ValueError, match=r"^bad memory size [^\n]*$"):
        parse_bytes(text)


def test_axis_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match=r"^layers\.moe\.w_down: dimension 1 \(logical 'experts', size 6\) "
                                         r"is not divisible by mesh axis 'ep' of size 4 \(and 2 more\)$"):
        plan_memory(TINY, {"ep": 4}, F32)
    with pytest.raises(ValueError, match=r"^tokens: dimension 0 \(logical 'batch', size 3\) is not divisible "
                                         r"by mesh axis 'dp' of size 2$"):
        plan_memory(TINY, {"dp": 2}, PlanSettings(batch=3))
    with pytest.raises(ValueError, match="mode must be one of"):
        PlanSettings(mode="serve")


def _cli(capsys, *args) -> dict:
    main(["--preset", "longcat_2", "--json", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_512_way_context_parallel_at_1m_tokens(capsys):
    """The full model, 1M tokens over cp=512: abstract shapes only, seconds on a CPU. cp shards no parameter,
    so each device holds every parameter (4 bytes each): the plan must say it does not fit."""
    report = _cli(capsys, "--mesh", "cp=512", "--seq-len", "1048576", "--remat", "full",
                  "--device-memory", "141GB")
    plan = report["memory_plan"]
    assert plan["devices"] == 512 and plan["tokens_per_device"] == 2048
    assert plan["per_device_bytes"]["params"] == 4 * (report["total_params"] + report["mtp_params"])
    assert plan["fits"] is False and plan["margin_bytes"] < 0
    # the same tokens over 512 devices with the experts, N-gram tables and widths spread too: it fits
    rules = "seq=pp+cp+ep,experts=ep+cp,ngram_rows=cp,ngram_dim=ep,heads=cp,mlp=cp+ep,vocab=cp+ep"
    spread = _cli(capsys, "--mesh", "pp=2,cp=16,ep=16", "--seq-len", "1048576", "--remat", "full",
                  "--rules", rules, "--device-memory", "141GB")["memory_plan"]
    assert spread["tokens_per_device"] == 2048 and spread["fits"] is True
    assert spread["per_device_bytes"]["params"] < plan["per_device_bytes"]["params"] / 100


def test_cli_ep128_decode_and_text_output(capsys):
    rules = "batch=ep,ngram_dim=ep,mlp=ep,vocab=ep"  # attention data-parallel over ep, wide tensors split
    plan = _cli(capsys, "--mode", "decode", "--mesh", "ep=128", "--rules", rules, "--batch", "128",
                "--context", "131072", "--param-dtype", "bfloat16", "--device-memory", "141GB")["memory_plan"]
    cfg = Config.longcat_2()
    per_token = 2 * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    per_token += cfg.num_layers * cfg.index_head_dim * 4  # one f32 indexer key per layer
    assert plan["per_device_bytes"]["kv_cache"] == 131072 * per_token + (cfg.ngram_n - 1) * 4  # one sequence
    assert plan["fits"] is True
    main(["--preset", "longcat_2", "--mesh", "ep=128", "--mode", "decode", "--batch", "128", "--context",
          "131072", "--device-memory", "141GB"])
    out = capsys.readouterr().out
    assert "memory plan per device: decode on mesh ep=128 (128 devices)" in out
    assert "kv_cache" in out and "DOES NOT FIT, short by" in out  # default rules: every sequence everywhere


def test_cli_errors_in_one_line(capsys):
    tables = "ngram.tables: dimension 0 (logical 'ngram_rows', size 263630608) is not divisible by mesh axis"
    for args, msg in [(["--mesh", "dp=2", "--device-memory", "lots"], "bad memory size 'lots'"),
                      (["--mesh", "vp=32"], tables + " 'vp' of size 32"),
                      (["--mesh", "dp=auto"], "has an auto axis: give the device count")]:
        with pytest.raises(SystemExit) as err:
            main(["--preset", "longcat_2", *args])
        assert err.value.code == 2
        assert msg in capsys.readouterr().err


def test_plain_report_unchanged_without_a_plan(capsys):
    main(["--preset", "tiny", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert "memory_plan" not in report and report == param_report(TINY)
