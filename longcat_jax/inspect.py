"""Parameter and KV-cache accounting from abstract shapes only (nothing is allocated).

    python -m longcat_jax.inspect --preset longcat_2 [--json]
    python -m longcat_jax.inspect --preset longcat_2 --mesh dp=2,cp=16,ep=16,tp=8 --seq-len 1048576 \\
        --remat full --device-memory 141GB        # per-device memory plan (longcat_jax/memory_plan.py)

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
from longcat_jax.memory_plan import (
    MODES,
    REMAT,
    PlanSettings,
    batch_ways,
    format_bytes,
    parse_bytes,
    plan_memory,
)
from longcat_jax.model.longcat import abstract_model
from sharding.mesh import parse_mesh
from sharding.rules import override_rules


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


def _plan_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("memory plan per device from abstract shapes (longcat_jax/memory_plan.py), "
                                  "made when --mesh, --mode or --device-memory is given")
    g.add_argument("--mesh", help="mesh axis sizes, e.g. dp=8,cp=64,ep=16,tp=8 (one axis may be auto)")
    g.add_argument("--devices", type=int, help="device count, to fill an auto mesh axis")
    g.add_argument("--rules", default="", help="rule overrides, e.g. experts=ep+cp,batch=dp+ep")
    g.add_argument("--mode", choices=MODES, help="train (params, grads, optimizer, activations) or decode "
                                               "(params, KV cache, one step)")
    g.add_argument("--batch", type=int, help="global sequences (default: one per batch shard)")
    g.add_argument("--seq-len", type=int, default=4096, help="train: tokens per sequence")
    g.add_argument("--context", type=int, default=4096, help="decode: cached tokens per sequence")
    g.add_argument("--dtype", default="bfloat16", help="compute dtype: activations and the KV latent")
    g.add_argument("--param-dtype", default="float32", help="parameters, gradients and optimizer state")
    g.add_argument("--remat", choices=REMAT, default="none", help="full keeps only each layer's input")
    g.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    g.add_argument("--device-memory", help="e.g. 80GiB, 141GB: says whether the plan fits")


def memory_plan(cfg: Config, args) -> dict:
    sizes = parse_mesh(args.mesh or "")
    rules = override_rules(args.rules)
    batch = args.batch if args.batch is not None else batch_ways(sizes, rules, args.devices)
    settings = PlanSettings(mode=args.mode or "train", batch=batch, seq_len=args.seq_len,
                            context=args.context, dtype=args.dtype, param_dtype=args.param_dtype,
                            remat=args.remat, optimizer=args.optimizer)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    plan = plan_memory(cfg, sizes, settings, rules, memory, args.devices)
    plan["rules"] = args.rules or "default"
    return plan


def _print_plan(plan: dict):
    train = plan["mode"] == "train"
    devices = f" ({plan['devices']:,} devices)" if plan["devices"] > 1 else ""
    print(f"\nmemory plan per device: {plan['mode']} on mesh {plan['mesh']}{devices}, rules {plan['rules']}")
    tokens = f"{plan['seq_len']:,} tokens" if train else f"{plan['context']:,} cached tokens"
    what = f"remat {plan['remat']}, optimizer {plan['optimizer']}" if train else "one decode step"
    n = plan["tokens_per_device"]
    share = f"{n:,} {'token' if train else 'sequence'}{'s' if n != 1 else ''} per device"
    print(f"  batch {plan['batch']:,} x {tokens} ({share}); params {plan['param_dtype']}, compute "
          f"{plan['dtype']}; {what}")
    top = sorted(plan["params_by_group"].items(), key=lambda kv: -kv[1])
    notes = {"params": "largest in GiB: " + ", ".join(f"{k} {v / 2**30:,.2f}" for k, v in top[:4] if v),
             "optimizer": "ZeRO-1 over dp", "activations": "estimate", "logits": "estimate, f32"}
    for key, value in plan["per_device_bytes"].items():
        note = f"   ({notes[key]})" if notes.get(key) else ""
        print(f"  {key:14s} {format_bytes(value):>16s}{note}")
    if "fits" in plan:
        verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
        margin = plan["margin_bytes"]
        left = f"margin {format_bytes(margin)} ({margin / plan['device_memory']:.0%})" if plan["fits"] else \
            f"short by {format_bytes(-margin)}"
        print(f"  {'device memory':14s} {format_bytes(plan['device_memory']):>16s}   {verdict}, {left}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=Config.PRESETS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _plan_args(parser)
    args = parser.parse_args(argv)
    cfg = Config.preset(args.preset)
    report = param_report(cfg)
    if args.mesh is not None or args.mode or args.device_memory:
        try:
            report["memory_plan"] = memory_plan(cfg, args)
        except ValueError as e:
            parser.error(str(e))
    if args.json:
        print(json.dumps(report))
        return
    print(f"preset {args.preset}")
    for key in ("total_params", "active_params_min", "active_params_avg", "active_params_max", "mtp_params",
                "ngram_table_params"):
        print(f"  {key:28s} {report[key] / 1e9:10.3f} B  ({report[key]:,})")
    for key in ("kv_cache_bytes_per_token", "mtp_kv_cache_bytes_per_token"):
        print(f"  {key:28s} {report[key]:10,d} bytes (bf16)")
    if "memory_plan" in report:
        _print_plan(report["memory_plan"])


if __name__ == "__main__":
    main()
