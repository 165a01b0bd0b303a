"""LongCat Sparse Attention against dense MLA: prefill time, peak memory, decode time and HI recall.

One attention stack of the `small` preset (one ScMoE layer = two MLA sublayers; N=8 heads, kv_lora 128,
rope 32; indexer 8 heads x 64, top-k 512), batch 1, float32, attention and indexer only (projections and MLPs
are the same in every variant and left out). Four variants of a prefill of T tokens:

  dense    both sublayers attend to every causal key (query-chunked absorbed attention, so it runs at 32K on a
           CPU; its *memory* is also reported for the plain quadratic reference)
  dsa      DeepSeek-style: an indexer on every sublayer, plain token top-k (no SI, no HI), sparse attention
  lsa      SI + CLI: one indexer per layer (sublayer 1 reuses sublayer 0's indices); SI's local window is
           read as a contiguous band and the indexer ranks only the other K - window slots
           (`select(window_apart=True)` + `sparse_mla(window=...)`, as the model's kernel path runs it)
  lsa_hi   lsa with hierarchical indexing (HI) switched on (block stage, then tokens inside the best blocks)

Indexer and attention are timed apart (each compiled ahead of time on its own, median of --repeats runs), so
"CLI halves the indexer time" and "HI cuts the indexer time" are read off directly. On CPU the memory-bounded
XLA paths of pallas_kernels run (impl="xla"); Pallas itself only runs interpreted on CPU, which is a
correctness mode. On a GPU/TPU `--impl pallas` times the kernels.

Peak memory is XLA's own memory analysis of the compiled prefill (arguments + outputs + temporaries, nothing
is executed), next to the quadratic reference: `model.indexer.select` plus `mla.attend_absorbed` with a
dense [T, S] mask, i.e. what the model does without the kernels.

Decode: one new token against a cache of --decode-context keys, dense against lsa.
HI recall: |HI picks ∩ exact picks| / |exact picks| per query, averaged, at the largest T, for the preset's
hi_top_blocks and for each value of --hi-top-blocks (with the HI indexer time of each). The inputs are
synthetic; indexer keys follow an AR(1) process along the sequence (correlation --key-correlation per token)
so that neighbouring keys are alike, as in real text; with i.i.d. random keys a block mean says nothing about
its tokens and HI's recall would be meaningless (`--key-correlation 0` measures that case).

Usage:
  python bench/lsa.py [--lengths 4096,8192,16384,32768,65536] [--time-dense-max 32768] [--json PATH]
                      [--png PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import Config
from longcat_jax.model import indexer as ix
from longcat_jax.ops.masks import attention_mask
from pallas_kernels import si_window, sparse_mla

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lsa_cpu.json")
VARIANTS = ("dense", "dsa", "lsa", "lsa_hi")


def variant_config(name: str, T: int) -> Config:
    """The small preset's attention with the variant's indexer switches (HI engages above hi_min_len)."""
    base = Config.small()
    if name == "dsa":
        return dataclasses.replace(base, si_enabled=False, hi_enabled=False, cli_factor=1)
    if name == "lsa":
        return dataclasses.replace(base, hi_enabled=False)
    if name == "lsa_hi":
        return dataclasses.replace(base, hi_enabled=True, hi_min_len=min(base.hi_min_len, T - 1))
    return base


def make_inputs(cfg: Config, T: int, key_correlation: float, seed: int = 0):
    """Latent queries/keys of one layer (two sublayers) and the indexer inputs, all f32, batch 1."""
    rng = np.random.default_rng(seed)
    N, R, Hr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    I, J = cfg.index_n_heads, cfg.index_head_dim

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    a = key_correlation
    noise = rng.standard_normal((T, J), dtype=np.float32)
    k_idx = np.empty_like(noise)
    k_idx[0] = noise[0]
    for s in range(1, T):  # AR(1): unit variance, correlation a between neighbours
        k_idx[s] = a * k_idx[s - 1] + np.sqrt(1 - a * a) * noise[s]
    sub = [dict(q_lat=normal(1, T, N, R, scale=R**-0.5), q_rope=normal(1, T, N, Hr, scale=Hr**-0.5),
                c_kv=normal(1, T, R), k_rope=normal(1, T, Hr)) for _ in range(2)]
    idx = dict(q=normal(1, T, I, J), k=jnp.asarray(k_idx[None]), w=jnp.abs(normal(1, T, I)) * (I * J) ** -0.5)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    return sub, [idx, dict(q=normal(1, T, I, J), k=jnp.asarray(k_idx[None]), w=idx["w"])], positions


def dense_chunked(q_lat, q_rope, c_kv, k_rope, positions, scale, block_q=64):
    """Causal absorbed attention over every key, one query block at a time: memory O(block_q * S)."""
    B, T, N, R = q_lat.shape
    nb = T // block_q

    def one(xs):
        ql, qr, qp = xs
        s = jnp.einsum("btnr,bsr->bnts", ql, c_kv) + jnp.einsum("btnh,bsh->bnts", qr, k_rope)
        mask = attention_mask(qp, positions)[:, None]
        s = jnp.where(mask, s * scale, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bnts,bsr->btnr", p, c_kv)

    def split(x):
        return jnp.moveaxis(x.reshape(B, nb, block_q, *x.shape[2:]), 1, 0)

    out = jax.lax.map(one, (split(q_lat), split(q_rope), split(positions)))
    return jnp.moveaxis(out, 0, 1).reshape(B, T, N, R)


def select(d, q_positions, k_positions, cfg: Config, impl: str, q_offset=0):
    """One owner's selection as the model's kernel path makes it (`si_window.select`)."""
    return si_window.select(d["q"], d["k"], d["w"], q_positions, k_positions, cfg, q_offset, impl=impl)


def indexer_fn(cfg: Config, impl: str):
    """The variant's selection: indices per sublayer (one owner under CLI, two without)."""

    def run(idx_inputs, positions):
        return [select(idx_inputs[i], positions, positions, cfg, impl) for i in range(cfg.indexer_sublayers)]

    return run


def attention_fn(cfg: Config, name: str, impl: str):
    scale = cfg.softmax_scale

    def run(sub, positions, indices):
        outs = []
        for i in range(2):
            s = sub[i]
            if name == "dense":
                outs.append(dense_chunked(s["q_lat"], s["q_rope"], s["c_kv"], s["k_rope"], positions, scale))
            else:
                sel = indices[min(i, len(indices) - 1)]
                outs.append(sparse_mla.sparse_mla(s["q_lat"], s["q_rope"], s["c_kv"], s["k_rope"], sel, scale,
                                                  window=si_window.window_size(cfg), impl=impl))
        return outs

    return run


def prefill_fn(cfg: Config, name: str, impl: str):
    """The variant's whole prefill (selection, then attention), for the memory analysis."""
    select, attend = indexer_fn(cfg, impl), attention_fn(cfg, name, impl)

    def run(sub, idx_inputs, positions):
        return attend(sub, positions, None if name == "dense" else select(idx_inputs, positions))

    return run


def quadratic_reference(cfg: Config):
    """What the model computes without the kernels: [T, S] indexer scores and dense masked attention."""

    def run(sub, idx_inputs, positions):
        d = idx_inputs[0]
        indices = ix.select(d["q"], d["k"], d["w"], positions, positions, cfg)
        return [sparse_mla.sparse_mla_reference(s["q_lat"], s["q_rope"], s["c_kv"], s["k_rope"], indices,
                                                cfg.softmax_scale)[0] for s in sub]

    return run


def peak_bytes(fn, *args) -> int:
    """XLA's memory analysis of the compiled function: arguments + outputs + temporaries (nothing runs)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    m = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def timed(fn, *args, repeats: int):
    """(median seconds over `repeats` runs of the ahead-of-time compiled fn, last output); compile not
    timed."""
    compiled = jax.jit(fn).lower(*args).compile()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def recall(hi, exact) -> float:
    """Mean over queries of |hi ∩ exact| / |exact| (valid slots only)."""
    hi, exact = np.asarray(hi[0]), np.asarray(exact[0])
    scores = []
    for h, e in zip(hi, exact):
        e = set(e[e >= 0].tolist())
        scores.append(len(e & set(h[h >= 0].tolist())) / max(len(e), 1))
    return float(np.mean(scores))


def bench_prefill(T: int, args) -> dict:
    row = {"T": T}
    results = {}
    # The same inputs for every variant.
    sub, idx_inputs, positions = make_inputs(Config.small(), T, args.key_correlation)
    for name in VARIANTS:
        cfg = variant_config(name, T)
        ind = indexer_fn(cfg, args.impl) if name != "dense" else None
        att = attention_fn(cfg, name, args.impl)
        entry = {}
        indices = None
        if name == "dense" and T > args.time_dense_max:
            entry["skipped"] = f"not timed above T={args.time_dense_max}"
        else:
            if ind is not None:
                entry["indexer_s"], indices = timed(ind, idx_inputs, positions, repeats=args.repeats)
            entry["attention_s"], _ = timed(att, sub, positions, indices, repeats=args.repeats)
            entry["total_s"] = entry.get("indexer_s", 0.0) + entry["attention_s"]

        entry["peak_bytes"] = peak_bytes(prefill_fn(cfg, name, args.impl), sub, idx_inputs, positions)
        if name == "lsa":
            entry["quadratic_reference_peak_bytes"] = peak_bytes(quadratic_reference(cfg), sub, idx_inputs,
                                                                 positions)
        results[name] = (entry, indices)
        row[name] = entry
        print(f"T={T:6d} {name:7s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in entry.items()), flush=True)
    if results["lsa_hi"][1] is not None and results["lsa"][1] is not None:
        row["hi_recall"] = recall(results["lsa_hi"][1][0], results["lsa"][1][0])
        print(f"T={T:6d} HI recall vs exact LSA selection: {row['hi_recall']:.4f}", flush=True)
    if T == max(args.lengths) and args.hi_top_blocks:
        row["hi_sweep"] = []
        for M in args.hi_top_blocks:
            cfg = dataclasses.replace(variant_config("lsa_hi", T), hi_top_blocks=M)
            t, indices = timed(indexer_fn(cfg, args.impl), idx_inputs, positions, repeats=args.repeats)
            entry = {"hi_top_blocks": M, "indexer_s": t, "recall": recall(indices[0], results["lsa"][1][0]),
                     "indexer_speedup": row["lsa"]["indexer_s"] / t}
            row["hi_sweep"].append(entry)
            print(f"T={T:6d} HI with {M} blocks: " + " ".join(f"{k}={v:.4f}" for k, v in entry.items()),
                  flush=True)
    return row


def bench_decode(S: int, args) -> dict:
    """One query at position S-1 against a full cache of S keys: dense vs lsa (indexer + sparse attention)."""
    cfg = variant_config("lsa", S)
    sub, idx_inputs, positions = make_inputs(cfg, S, args.key_correlation)
    q_pos = positions[:, -1:]
    s, d = sub[0], idx_inputs[0]
    last = {k: v[:, -1:] for k, v in s.items() if k in ("q_lat", "q_rope")}
    scale = cfg.softmax_scale

    def dense(s, last):
        return dense_chunked(last["q_lat"], last["q_rope"], s["c_kv"], s["k_rope"], q_pos, scale, block_q=1)

    def lsa(s, d, last):
        one = {"q": d["q"][:, -1:], "k": d["k"], "w": d["w"][:, -1:]}
        sel = select(one, q_pos, positions, cfg, args.impl, q_offset=S - 1)
        return sparse_mla.sparse_mla(last["q_lat"], last["q_rope"], s["c_kv"], s["k_rope"], sel, scale,
                                     window=si_window.window_size(cfg), q_offset=S - 1, impl=args.impl)

    t_dense, _ = timed(dense, s, last, repeats=args.repeats * 5)
    t_lsa, _ = timed(lsa, s, d, last, repeats=args.repeats * 5)
    print(f"decode at {S}: dense {t_dense * 1e3:.2f} ms, lsa {t_lsa * 1e3:.2f} ms", flush=True)
    return {"context": S, "dense_s": t_dense, "lsa_s": t_lsa, "note": "one sublayer, one new token"}


def summarize(rows: list[dict], decode: dict) -> dict:
    by_t = {r["T"]: r for r in rows}
    out = {}
    if 32768 in by_t:
        r = by_t[32768]
        if "total_s" in r["dense"]:
            out["lsa_vs_dense_at_32k"] = r["dense"]["total_s"] / r["lsa"]["total_s"]
        out["lsa_vs_dsa_at_32k"] = r["dsa"]["total_s"] / r["lsa"]["total_s"]
        # CLI (one indexer per layer) and SI's window apart (a smaller top-k) together.
        out["indexer_time_dsa_over_lsa_at_32k"] = r["dsa"]["indexer_s"] / r["lsa"]["indexer_s"]
    big = max(by_t)
    r = by_t[big]
    out["largest_T"] = big
    out["hi_indexer_speedup_at_largest_T"] = r["lsa"]["indexer_s"] / r["lsa_hi"]["indexer_s"]
    out["hi_recall_at_largest_T"] = r.get("hi_recall")
    out["hi_top_blocks"] = Config.small().hi_top_blocks
    good = [e for e in r.get("hi_sweep", []) if e["recall"] >= 0.95 and e["indexer_speedup"] >= 3]
    out["hi_fewest_blocks_meeting_both_targets_at_largest_T"] = min((e["hi_top_blocks"] for e in good),
                                                                    default=None)
    out["lsa_peak_over_quadratic_at_largest_T"] = (r["lsa"]["peak_bytes"]
                                                   / r["lsa"]["quadratic_reference_peak_bytes"])
    out["decode_speedup"] = decode["dense_s"] / decode["lsa_s"]
    out["targets"] = {
        "lsa >= 4x dense at 32K": out.get("lsa_vs_dense_at_32k", 0) >= 4,
        "lsa >= 1.8x dsa at 32K": out.get("lsa_vs_dsa_at_32k", 0) >= 1.8,
        "CLI halves indexer time": out.get("indexer_time_dsa_over_lsa_at_32k", 0) >= 2,
        "HI >= 3x indexer speedup at 64K": big == 65536 and out["hi_indexer_speedup_at_largest_T"] >= 3,
        "HI recall >= 0.95 at 64K": big == 65536 and (out["hi_recall_at_largest_T"] or 0) >= 0.95,
        "peak at 64K <= 1/8 quadratic": big == 65536 and out["lsa_peak_over_quadratic_at_largest_T"] <= 1 / 8,
    }
    return out


def plot(rows: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    Ts = [r["T"] for r in rows]
    for name in VARIANTS:
        pts = [(r["T"], r[name]["total_s"]) for r in rows if "total_s" in r[name]]
        if pts:
            a.plot(*zip(*pts), marker="o", label=name)
        b.plot(Ts, [r[name]["peak_bytes"] / 2**30 for r in rows], marker="o", label=name)
    b.plot(Ts, [r["lsa"]["quadratic_reference_peak_bytes"] / 2**30 for r in rows], marker="x", ls="--",
           label="quadratic reference")
    for ax, title, unit in ((a, "prefill time (attention + indexer)", "seconds"),
                            (b, "peak memory (XLA)", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    p.add_argument("--time-dense-max", type=int, default=32768,
                   help="dense prefill is not timed above this T")
    p.add_argument("--decode-context", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--key-correlation", type=float, default=0.99)
    p.add_argument("--hi-top-blocks", default="24,32",
                   help="extra HI block budgets timed at the largest T, for the recall / speed trade-off")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--png", default="")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.hi_top_blocks = [int(x) for x in args.hi_top_blocks.split(",") if x]
    if any(T % 64 for T in args.lengths):
        p.error("every length must be a multiple of 64")
    rows = [bench_prefill(T, args) for T in args.lengths]
    decode = bench_decode(args.decode_context, args)
    result = dict(
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), jax=jax.__version__,
                     backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                     date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     loadavg=os.getloadavg()),
        settings=dict(vars(args),
                      attention="Config.small: N=8, kv_lora 128, rope 32; indexer 8x64, top-k 512, "
                                "SI 16 sinks + 256 local, HI blocks of 64, top 16 blocks"),
        prefill=rows, decode=decode, summary=summarize(rows, decode))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.png:
        plot(rows, args.png)
    return result


if __name__ == "__main__":
    main()
