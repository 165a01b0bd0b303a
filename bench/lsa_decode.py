"""The LSA part of bench/serve.py: one decode step of `model.longcat.paged_step` (jit, batch 1, one new
token) for the `small` preset's LSA variants (indexer with SI, CLI and HI; XLA or reference kernels; HI off)
against its dense twin (no indexer), over a paged cache whose rows hold random values, per context. Every
variant's step is compiled first, then the timed steps run interleaved so that load from other users of a
shared machine hits all variants alike; the median per variant and its speedup over dense are recorded.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import longcat_jax as lj


def lsa_variants(names: list[str]) -> dict:
    all_ = {
        "lsa_xla": lambda: lj.Config.small(kernel_impl="xla"),
        "lsa_reference": lambda: lj.Config.small(kernel_impl="reference"),
        "lsa_xla_no_hi": lambda: lj.Config.small(kernel_impl="xla", hi_enabled=False),
        "dense": lambda: lj.Config.small(use_indexer=False, si_enabled=False, hi_enabled=False),
    }
    unknown = set(names) - set(all_)
    if unknown:
        raise ValueError(f"unknown LSA variants {sorted(unknown)}; choose from {', '.join(all_)}")
    return {n: all_[n] for n in names}


def prepare_decode_step(model, context: int, page_size: int, seed: int = 0):
    """(run one step, compile seconds): one paged_step as the engine runs it (`jit_paged_step`, batch 1, one
    new token at position context - 1) over a paged cache of `context` rows of random values."""
    from longcat_jax.model.longcat import jit_paged_step
    from longcat_jax.model.paged_cache import PagedCache, index_sums, init_paged_cache

    cfg = model.cfg
    W = -(-context // page_size)
    k1, k2 = jax.random.split(jax.random.key(seed))
    abstract = jax.eval_shape(lambda: init_paged_cache(cfg, W, page_size))
    kv = jax.random.normal(k1, abstract.kv.shape, abstract.kv.dtype)
    index_k = index_sum = None
    if abstract.index_k is not None:
        index_k = jax.random.normal(k2, abstract.index_k.shape, abstract.index_k.dtype)
    if abstract.index_sum is not None:  # HI's page sums, kept equal to the rows as the engine keeps them
        index_sum = index_sums(index_k, page_size // abstract.index_sum.shape[3])
    step, params = jit_paged_step(model)  # the serving engine's form of the step (per-layer arrays on CPU)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, 1)), jnp.int32)
    starts, new_lens = jnp.asarray([context - 1], jnp.int32), jnp.asarray([1], jnp.int32)
    table = jnp.arange(W, dtype=jnp.int32)[None]
    H = (cfg.ngram_n or 1) - 1
    history = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, H)), jnp.int32) if H else None
    state = {"cache": PagedCache(kv=kv, index_k=index_k, index_sum=index_sum)}
    t = time.perf_counter()
    compiled = step.lower(params, tokens, starts, new_lens, table, state["cache"], history).compile()
    compile_s = time.perf_counter() - t

    def run():
        t = time.perf_counter()
        logits, state["cache"] = compiled(params, tokens, starts, new_lens, table, state["cache"], history)
        jax.block_until_ready((logits, state["cache"]))
        dt = time.perf_counter() - t
        if not bool(jnp.isfinite(logits).all()):
            raise FloatingPointError("non-finite logits")
        return dt

    return run, compile_s


def bench_lsa(args, result: dict, save) -> None:
    """Per context: every variant's step compiled, then the timed steps interleaved (A, B, C, A, B, C...),
    so load from other users of a shared machine hits all variants alike."""
    contexts = [int(x) for x in args.lsa_contexts.split(",")] if args.lsa_contexts else (
        [4096] if args.quick else [4096, 16384, 32768])
    if args.lsa_baseline_context and args.lsa_baseline_context not in contexts:
        contexts = [args.lsa_baseline_context, *contexts]
    out = dict(preset="small", contexts=contexts, page_size=args.page_size, steps=args.lsa_steps,
               warmup=args.lsa_warmup,
               what="the whole model's decode step (embedding with N-gram, 4 layers of MLA + MLPs + MoE, LM "
                    f"head), not attention alone; context {args.lsa_baseline_context} shows the part that "
                    "does not grow with the context",
               note="cache rows filled with random values: decode time does not depend on the contents, and "
                    "prefilling 32K tokens on this CPU would take far too long",
               variants={})
    result["lsa_decode"] = out
    models = {}
    for name, make in lsa_variants(args.lsa_variants.split(",")).items():
        cfg = make()
        t = time.perf_counter()
        models[name] = lj.build_model(cfg, seed=0)
        out["variants"][name] = dict(kernel_impl=cfg.kernel_impl, use_indexer=cfg.use_indexer,
                                     hi_enabled=cfg.hi_enabled, hi_min_len=cfg.hi_min_len,
                                     index_topk=cfg.index_topk if cfg.use_indexer else None,
                                     build_s=time.perf_counter() - t, rows=[])
    for ctx in contexts:
        runners = {}
        for name, model in models.items():
            try:
                runners[name] = prepare_decode_step(model, ctx, args.page_size)
            except Exception as e:  # out of memory at the longest contexts: report what fits
                error = f"{type(e).__name__}: {e}"[:400]
                out["variants"][name]["rows"].append(dict(context=ctx, error=error))
                print(f"lsa {name:14s} context {ctx:6d}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        times = {name: [] for name in runners}
        failed = {}
        for i in range(args.lsa_warmup + args.lsa_steps):
            for name, (run, _) in runners.items():
                if name in failed:
                    continue
                try:
                    dt = run()
                except Exception as e:
                    failed[name] = f"{type(e).__name__}: {e}"[:400]
                    continue
                if i >= args.lsa_warmup:
                    times[name].append(dt)
        for name, (_, compile_s) in runners.items():
            if name in failed:
                row = dict(context=ctx, error=failed[name])
                msg = row["error"][:200]
            else:
                row = dict(context=ctx, median_s=statistics.median(times[name]), times_s=times[name],
                           compile_s=compile_s, cache_pages=-(-ctx // args.page_size),
                           page_size=args.page_size)
                msg = f"{row['median_s'] * 1e3:8.2f} ms/token (compile {compile_s:.1f} s)"
            out["variants"][name]["rows"].append(row)
            print(f"lsa {name:14s} context {ctx:6d}: {msg}", flush=True)
        del runners
        save()
    dense = {r["context"]: r.get("median_s") for r in out["variants"].get("dense", {}).get("rows", [])}
    for name, v in out["variants"].items():
        if name == "dense":
            continue
        for r in v["rows"]:
            if r.get("median_s") and dense.get(r["context"]):
                r["speedup_vs_dense"] = dense[r["context"]] / r["median_s"]
