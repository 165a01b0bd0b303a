"""The reporting of bench/serve.py: the summary of a result (ours over theirs per concurrency level, the
batch-1 decode speedup, LSA against dense decode at long context, and which targets are met), its printed
tables, and the PNG beside the result JSON (throughput and time to first token by concurrent streams, decode
time per token by context).
"""

from __future__ import annotations


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.0f} ms"


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize(result: dict) -> dict:
    s, targets = {}, {}
    srv = result.get("serving", {})
    if all("levels" in srv.get(n, {}) for n in ("ours", "transformers")):
        by = {name: {r["concurrency"]: r for r in srv[name]["levels"]} for name in ("ours", "transformers")}
        for c in srv["levels"]:
            o, t = by["ours"].get(c), by["transformers"].get(c)
            if o and t:
                s[f"throughput_ratio_at_{c}"] = ratio(o["output_tokens_per_s"], t["output_tokens_per_s"])
                s[f"ttft_median_ratio_at_{c}"] = ratio(o["ttft_median_s"], t["ttft_median_s"])
                s[f"tpot_median_ratio_at_{c}"] = ratio(o["tpot_median_s"], t["tpot_median_s"])
        for c in (8, 32):
            if f"throughput_ratio_at_{c}" in s:
                targets[f">= 3x transformers serve throughput at {c} streams, lower median TTFT"] = bool(
                    s[f"throughput_ratio_at_{c}"] >= 3 and (s[f"ttft_median_ratio_at_{c}"] or 9) < 1)
    if "decode_batch1" in result:
        s["decode_batch1_speedup"] = result["decode_batch1"]["speedup"]
        targets[">= 3x transformers generate at batch-1 decode"] = bool(s["decode_batch1_speedup"] >= 3)
    lsa = result.get("lsa_decode", {}).get("variants", {})
    main = lsa.get("lsa_xla")
    if main:
        rows = {r["context"]: r for r in main["rows"] if "median_s" in r}
        if 32768 in rows and rows[32768].get("speedup_vs_dense"):
            s["lsa_speedup_at_32k"] = rows[32768]["speedup_vs_dense"]
            targets["LSA decode >= 2x dense at 32K"] = bool(s["lsa_speedup_at_32k"] >= 2)
        if 4096 in rows and 32768 in rows:
            s["lsa_growth_4k_to_32k"] = rows[32768]["median_s"] / rows[4096]["median_s"]
            targets["LSA time per token nearly flat 4K->32K (<= 1.5x)"] = bool(
                s["lsa_growth_4k_to_32k"] <= 1.5)
        d = {r["context"]: r for r in lsa.get("dense", {}).get("rows", []) if "median_s" in r}
        if 4096 in d and 32768 in d:
            s["dense_growth_4k_to_32k"] = d[32768]["median_s"] / d[4096]["median_s"]
    s["targets"] = targets
    return s


def print_summary(result: dict) -> None:
    s = result["summary"]
    srv = result.get("serving", {})
    if srv:
        print("\n=== Serving (streaming chat completions, greedy, "
              f"{srv.get('max_tokens')} output tokens; folder: {result['folder']['params'] / 1e6:.1f}M "
              "params) ===")
    names = [n for n in ("ours", "transformers") if "levels" in srv.get(n, {})]
    for n in ("ours", "transformers"):
        if "error" in srv.get(n, {}):
            print(f"  {n}: FAILED: {srv[n]['error'].strip().splitlines()[-1]}")
    if names:
        print(f"{'streams':>7} {'server':>13} {'tok/s':>9} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} "
              f"{'TPOT p99':>9} {'tok/req':>9} {'errors':>6}")
        for c in srv["levels"]:
            for n in names:
                r = next((x for x in srv[n]["levels"] if x["concurrency"] == c), None)
                if r is None:
                    continue
                tpr = r["output_tokens_per_request"]
                print(f"{c:7d} {n:>13} {r['output_tokens_per_s']:9.1f} {fmt_ms(r['ttft_median_s']):>9} "
                      f"{fmt_ms(r['ttft_p99_s']):>9} {fmt_ms(r['tpot_median_s']):>9} "
                      f"{fmt_ms(r['tpot_p99_s']):>9} "
                      f"{tpr['min']:>4}-{tpr['max']:<4} {len(r['errors']):6d}")
            if f"throughput_ratio_at_{c}" in s:
                print(f"{c:7d} {'ours/theirs':>13} {s[f'throughput_ratio_at_{c}']:8.2f}x "
                      f"{s[f'ttft_median_ratio_at_{c}']:8.2f}x {'':9} {s[f'tpot_median_ratio_at_{c}']:8.2f}x")
        for n in names:
            print(f"  {n} startup (load + compile/warm-up until /health): {srv[n]['startup_s']:.1f} s")
        if "ours" in names:
            per = {r["concurrency"]: r.get("programs_compiled_during_timed_requests")
                   for r in srv["ours"]["levels"]}
            print(f"  ours: engine programs compiled while timed requests ran, by streams: {per} "
                  f"(of {srv['ours'].get('programs_compiled_total')} in all)")
    if "decode_batch1" in result:
        d = result["decode_batch1"]
        print(f"\n=== Decode, batch 1, {d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens ===")
        for n in ("ours", "transformers", "transformers_bfloat16"):
            if n not in d:  # results from before transformers was also timed in bfloat16
                continue
            print(f"{n:>13}: {d[n]['decode_s_per_token'] * 1e3:7.2f} ms/token = "
                  f"{d[n]['decode_tokens_per_s']:7.1f} tok/s  (64 tokens in {d[n]['median_full_s']:.2f} s)")
        against = d.get("speedup_against", "transformers in float32")
        print(f"{'ours/theirs':>13}: {d['speedup']:.2f}x faster (against {against}); greedy outputs agree "
              f"on the first {d['greedy_tokens_agreeing_from_start']} tokens")
    lsa = result.get("lsa_decode")
    if lsa:
        print("\n=== Decode step, small preset, batch 1, paged cache of random rows (ms/token) ===")
        print(f"{'context':>8} " + " ".join(f"{n:>14}" for n in lsa["variants"])
              + "   LSA(xla)/dense speedup")
        for ctx in lsa["contexts"]:
            cells, sp = [], ""
            for n, v in lsa["variants"].items():
                r = next((x for x in v["rows"] if x["context"] == ctx), {})
                cells.append(f"{r['median_s'] * 1e3:14.2f}" if "median_s" in r else f"{'-':>14}")
                if n == "lsa_xla" and r.get("speedup_vs_dense"):
                    sp = f"{r['speedup_vs_dense']:.2f}x"
            print(f"{ctx:8d} " + " ".join(cells) + f"   {sp}")
    print("\n=== Targets ===")
    for k, v in s["targets"].items():
        print(f"  {'met    ' if v else 'NOT met'}  {k}")
    if not s["targets"]:
        print("  (none measurable in this run)")


def save_png(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    srv = result.get("serving", {})
    labels = {"ours": "longcat-jax serve.py", "transformers": "transformers serve --continuous-batching"}
    for name, color in (("ours", "C0"), ("transformers", "C1")):
        if "levels" in srv.get(name, {}):
            rows = srv[name]["levels"]
            xs = [r["concurrency"] for r in rows]
            a.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", color=color, label=labels[name])
            b.plot(xs, [r["ttft_median_s"] * 1e3 for r in rows], marker="o", color=color,
                   label=labels[name] + " (median)")
            b.plot(xs, [r["ttft_p99_s"] * 1e3 for r in rows], marker="x", ls="--", color=color,
                   label=labels[name] + " (p99)")
    for ax, title, unit in ((a, "output throughput", "tokens/s"), (b, "time to first token", "ms")):
        ax.set_xscale("log", base=2)
        if srv.get("levels"):
            ax.set_xticks(srv["levels"], [str(x) for x in srv["levels"]])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
    b.set_yscale("log")
    lsa = result.get("lsa_decode", {}).get("variants", {})
    for name, v in lsa.items():
        pts = [(r["context"], r["median_s"] * 1e3) for r in v["rows"] if "median_s" in r]
        if pts:
            c.plot(*zip(*pts), marker="o", label=name)
    c.set_xscale("log", base=2)
    if result.get("lsa_decode"):
        c.set_xticks(result["lsa_decode"]["contexts"],
                     [f"{x // 1024}K" if x >= 1024 else str(x) for x in result["lsa_decode"]["contexts"]])
    c.set_xlabel("context (tokens)")
    c.set_ylabel("ms per token")
    c.set_title("decode step, small preset: LSA vs dense")
    if c.lines:
        c.legend(fontsize=7)
    fig.suptitle(f"CPU ({result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores), float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
