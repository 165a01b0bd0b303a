"""Parameter and KV-cache accounting from abstract shapes only (nothing is allocated).

    python -m longcat_jax.inspect --preset longcat_2 [--json]

total_params excludes the MTP block (reported apart), as the published totals do
(docs/architecture.md#presets).
Activated parameters per token count every weight a token touches: all dense weights, the router, the LM head,
the one token-embedding row and the G N-gram rows it looks up, and the real experts it is routed to. min
routes all top-k slots to zero experts, max all to real experts, avg uses cfg.expected_real_experts (or the
uniform share top_k * E / (E + Z) when unset).
"""

from __future__ import annotations

import argparse
import json
import math

from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.longcat import abstract_model


def _sizes(cfg: Config) -> dict[tuple, int]:
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                out[prefix + (k,)] = math.prod(v.shape)

    walk(state, ())
    return out


def param_report(cfg: Config) -> dict:
    sizes = _sizes(cfg)
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    total = sum(sizes.values()) - mtp
    experts = sum(n for p, n in sizes.items()
                  if p[:2] == ("layers", "moe") and p[2] in ("w_gate", "w_up", "w_down"))
    per_expert_per_layer = experts // (cfg.num_layers * cfg.n_routed_experts)
    tables = sizes[("embed",)] + sizes.get(("ngram", "tables"), 0)
    looked_up = cfg.hidden_size + cfg.ngram_branches * cfg.ngram_dim
    base = total - experts - tables + looked_up
    per_real_expert = per_expert_per_layer * cfg.num_layers
    avg_real = cfg.expected_real_experts
    if avg_real is None:
        avg_real = cfg.moe_topk * cfg.n_routed_experts / cfg.num_slots
    bytes_per = 2  # bf16 KV cache
    kv_trunk = cfg.num_sublayers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_trunk += cfg.num_layers * cfg.indexer_sublayers * cfg.index_head_dim
    kv_mtp = 0
    if cfg.mtp_num_steps:
        kv_mtp = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.use_indexer else 0)
    return {
        "total_params": total,
        "active_params_min": base,
        "active_params_avg": int(round(base + avg_real * per_real_expert)),
        "active_params_max": base + min(cfg.moe_topk, cfg.n_routed_experts) * per_real_expert,
        "kv_cache_bytes_per_token": kv_trunk * bytes_per,
        "mtp_params": mtp,
        "mtp_kv_cache_bytes_per_token": kv_mtp * bytes_per,
        "ngram_table_params": sizes.get(("ngram", "tables"), 0),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=Config.PRESETS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = param_report(Config.preset(args.preset))
    if args.json:
        print(json.dumps(report))
        return
    print(f"preset {args.preset}")
    for key in ("total_params", "active_params_min", "active_params_avg", "active_params_max", "mtp_params",
                "ngram_table_params"):
        print(f"  {key:28s} {report[key] / 1e9:10.3f} B  ({report[key]:,})")
    for key in ("kv_cache_bytes_per_token", "mtp_kv_cache_bytes_per_token"):
        print(f"  {key:28s} {report[key]:10,d} bytes (bf16)")


if __name__ == "__main__":
    main()
