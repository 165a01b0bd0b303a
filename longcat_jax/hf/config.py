"""Hugging Face `config.json` <-> Config for the three LongCat layouts (docs/architecture.md#hf-checkpoints).

  LongcatFlashForCausalLM        LongCat-Flash (transformers' `longcat_flash`)
  LongcatFlashNgramForCausalLM   LongCat-Flash-Lite (`ngram_*` / `emb_*` fields)
  LongcatCausalLM                LongCat-2.0 (`oe_*` fields, DSA indexer, 3-step MTP)
"""

from __future__ import annotations

import dataclasses

from longcat_jax.config import Config

FLASH, LITE, LONGCAT2 = "LongcatFlashForCausalLM", "LongcatFlashNgramForCausalLM", "LongcatCausalLM"
ARCHITECTURES = (FLASH, LITE, LONGCAT2)

# Fields whose HF name equals ours.
_SAME = (
    "vocab_size", "hidden_size", "num_layers", "ffn_hidden_size", "rms_norm_eps", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_scale_q_lora",
    "mla_scale_kv_lora", "max_position_embeddings", "n_routed_experts", "zero_expert_num", "moe_topk",
    "expert_ffn_hidden_size", "routed_scaling_factor", "index_n_heads", "index_head_dim", "index_topk",
    "indexer_rope_interleave", "index_init_tokens", "index_local_tokens", "cli_factor", "bos_token_id",
    "eos_token_id", "pad_token_id",
)


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise ValueError(f"config.json architectures {archs!r}: expected one of {', '.join(ARCHITECTURES)}")
    return archs[0]


def _first_int(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def config_from_hf(hf: dict, **overrides) -> Config:
    """Build a Config from a parsed config.json; `overrides` replace any field afterwards."""
    arch = architecture_of(hf)
    kw: dict = {k: hf[k] for k in _SAME if k in hf and hf[k] is not None}
    kw["num_heads"] = hf["num_attention_heads"]
    kw["eos_token_id"] = _first_int(hf.get("eos_token_id", 2))
    kw["routed_scaling_factor"] = float(hf.get("routed_scaling_factor", 1.0))
    if hf.get("num_key_value_heads") not in (None, hf["num_attention_heads"]):
        raise ValueError("MLA has no grouped KV heads: num_key_value_heads must equal num_attention_heads")

    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 1e7 if arch == FLASH else 1e6)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("yarn", "deepseek_yarn"):
        kw.update(
            rope_factor=float(rope["factor"]),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            rope_beta_fast=float(rope.get("beta_fast", 32)), rope_beta_slow=float(rope.get("beta_slow", 1)),
            rope_mscale=float(rope.get("mscale", 1)),
            rope_mscale_all_dim=float(rope.get("mscale_all_dim", 0)),
        )
    elif rope_type == "default":
        kw["rope_factor"] = 1.0
    else:
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, yarn, deepseek_yarn)")

    if arch == LITE:
        kw.update(ngram_n=hf["emb_neighbor_num"], ngram_splits=hf["emb_split_num"],
                  ngram_vocab_ratio=float(hf["ngram_vocab_size_ratio"]))
    elif arch == LONGCAT2:
        kw.update(ngram_n=hf["oe_neighbor_num"], ngram_splits=hf["oe_split_num"],
                  ngram_vocab_ratio=float(hf["oe_vocab_size_ratio"]))
    else:
        kw["ngram_n"] = 0
    if kw["ngram_n"]:
        kw["ngram_dim"] = hf.get("ngram_dim", hf["hidden_size"] // ((kw["ngram_n"] - 1) * kw["ngram_splits"]))

    kw["use_indexer"] = bool(hf.get("use_longcat_dsa", False))
    if not kw["use_indexer"]:
        kw["si_enabled"] = False
    if "index_k_norm_eps" in hf:
        kw["index_k_norm_eps"] = hf["index_k_norm_eps"]
    kw["mtp_num_steps"] = int(hf.get("mtp_num_layers") or hf.get("num_nextn_predict_layers") or 0)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    kw.update(param_dtype=dtype, dtype=dtype)
    kw.update(hf.get("longcat_jax", {}))  # fields only this project writes (see config_to_hf)
    kw.update(overrides)
    return Config(**kw)


def default_architecture(cfg: Config) -> str:
    if cfg.ngram_n and cfg.use_indexer:
        return LONGCAT2
    return LITE if cfg.ngram_n else FLASH


def config_to_hf(cfg: Config, architecture: str | None = None) -> dict:
    """The config.json of `architecture` (default: the one that holds every enabled feature)."""
    arch = architecture or default_architecture(cfg)
    if arch == FLASH and (cfg.ngram_n or cfg.use_indexer):
        raise ValueError("the LongcatFlashForCausalLM layout has no N-gram embedding or indexer")
    if arch == LITE and cfg.use_indexer:
        raise ValueError("the Flash-Lite layout has no indexer")
    hf = {k: getattr(cfg, k) for k in _SAME}
    model_type = {FLASH: "longcat_flash", LITE: "longcat_flash_ngram", LONGCAT2: "longcat"}[arch]
    hf.update(architectures=[arch], model_type=model_type, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_heads, head_dim=cfg.qk_rope_head_dim, qk_head_dim=cfg.qk_head_dim,
              hidden_act="silu", attention_bias=False, tie_word_embeddings=False, dtype=cfg.param_dtype)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1.0:
        rope.update(rope_type="yarn", factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position,
                    beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
                    mscale_all_dim=cfg.rope_mscale_all_dim)
    hf["rope_parameters"] = rope
    if arch == LITE:
        hf.update(emb_neighbor_num=cfg.ngram_n, emb_split_num=cfg.ngram_splits,
                  ngram_vocab_size_ratio=cfg.ngram_vocab_ratio, ngram_dim=cfg.ngram_dim)
    if arch == LONGCAT2:
        hf.update(oe_neighbor_num=cfg.ngram_n, oe_split_num=cfg.ngram_splits,
                  oe_vocab_size_ratio=cfg.ngram_vocab_ratio, ngram_dim=cfg.ngram_dim, use_longcat_dsa=True,
                  index_k_norm_type="rms", index_k_norm_eps=cfg.index_k_norm_eps)
    if cfg.mtp_num_steps:
        hf.update(mtp_num_layers=cfg.mtp_num_steps, num_nextn_predict_layers=1, mtp_replicate_modules=True)
    # Fields HF does not know, kept so a round trip restores the exact Config.
    hf["longcat_jax"] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in hf}
    return hf
