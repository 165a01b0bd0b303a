"""Time the Mosaic (TPU) kernels against the chip's peak, and list each kernel's grid and VMEM footprint.

    python bench/tpu_kernels.py                        # on a TPU: time at the `small` preset's sizes
    python bench/tpu_kernels.py --preset tiny --T 16   # on CPU: the same calls under the TPU interpreter

On a TPU each case is jitted, run once to compile, then timed over --reps runs (median); TFLOP/s and GB/s
come from the analytic FLOPs and HBM bytes of the case (the rows the kernel gathers by DMA, its inputs and
outputs) against `pltpu.get_tpu_info()` (per TensorCore). Off a TPU the kernels run under the TPU
interpreter: the times mean nothing, but every case is checked against the XLA path of the same entry point.

The table (`footprints`) comes from tracing each case for TPU (`impl.lowering_for("tpu")`): per pallas_call
its grid and the VMEM its blocks take, double-buffered as Mosaic pipelines them, padded to (8 * packing, 128)
tiles, plus its scratch; SMEM blocks apart. Which kernels exist: pallas_kernels/impl.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.extend.core as jex_core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longcat_jax.config import Config  # noqa: E402
from pallas_kernels import impl  # noqa: E402
from pallas_kernels.indexer_kl import sparse_indexer_kl  # noqa: E402
from pallas_kernels.indexer_topk import select  # noqa: E402
from pallas_kernels.ngram_lookup import ngram_lookup  # noqa: E402
from pallas_kernels.sparse_mla import sparse_mla  # noqa: E402
from pallas_kernels.sparse_mla_decode import sparse_mla_decode_paged  # noqa: E402
from pallas_kernels.tpu_indexer_topk import TILES as TOPK_TILES  # noqa: E402
from pallas_kernels.tpu_sparse_mla_decode import tpu_sparse_mla_decode_paged  # noqa: E402


def cases(cfg: Config, T: int, batch: int, seed: int = 0):
    """{name: (fn(impl), args, flops, hbm_bytes)}: each fn(impl) is the entry point with impl "pallas" (the
    TPU kernel on a TPU) or "xla" (the reference for the check)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, dtype=jnp.bfloat16):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    B, N, R, Hr, K = batch, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_topk
    W, page = R + Hr, min(64, T)
    picks = np.sort(rng.integers(0, T, (B, T, K)), axis=-1)
    idx = jnp.asarray(np.where(picks <= np.arange(T)[None, :, None], picks, -1), jnp.int32)
    pages = jnp.asarray(rng.permutation(B * T // page).reshape(B, T // page), jnp.int32)
    q_args = (normal(B, T, N, R), normal(B, T, N, Hr), normal(B, T, R), normal(B, T, Hr))
    dec_args = (normal(B, N, R), normal(B, N, Hr), normal(B * T // page, page, W))
    G, dim, D = cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size
    tables, proj = normal(sum(cfg.ngram_table_rows), dim), normal(G, dim, D)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    row_bytes = W * 2  # bf16 latent rows
    I, J = cfg.index_n_heads, cfg.index_head_dim
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    index_args = (normal(B, T, I, J), normal(B, T, J), normal(B, T, I, dtype=jnp.float32))
    target = jnp.asarray(rng.random((B, T, K)), jnp.float32)

    def decode(kind):
        def run(*a):  # the backend is read when traced, inside impl.interpreting / lowering_for
            if kind == "pallas" and impl.backend() == "mosaic":
                return tpu_sparse_mla_decode_paged(*a, pages, idx[:, -1], 0.1)
            return sparse_mla_decode_paged(*a, pages, idx[:, -1], 0.1, impl=kind)

        return run

    def mla_fwd(kind):
        return lambda *a: sparse_mla(*a, idx, 0.1, impl=kind, return_probs=True)

    def mla_fwd_bwd(kind):
        def loss(*a):
            o, p = sparse_mla(*a, idx, 0.1, impl=kind, return_probs=True)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(p)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    def ngram(kind):
        return lambda t, p: ngram_lookup(t, p, tokens, cfg, impl=kind)

    def topk(kind):  # as the model's owner sublayers call it (si_window): the SI window kept apart
        return lambda *a: select(*a, pos, pos, cfg, window_apart=cfg.si_enabled, impl=kind)

    def kl_fwd_bwd(kind):
        return jax.grad(lambda *a: sparse_indexer_kl(*a, idx, target, impl=kind), argnums=(0, 1, 2))

    attn = 2 * 2 * B * T * N * K * W  # scores and weighted sum over the gathered rows (full width)
    gathered = B * T * K * row_bytes
    # top-k: the causal half of [T, S] scored, key tiles (bf16 keys + 3 int32 of metadata) read once per
    # query block; the bitonic merges are VPU work, not counted.
    topk_flops = 2 * B * T * (T // 2) * I * J
    topk_bytes = B * (T // TOPK_TILES[0]) * (T // 2) * (2 * J + 12) + B * T * (I * J * 2 + K * 4)
    # KL: logits forward; logits again, dq and the slot gradients backward. Rows gathered twice, f32 slot
    # gradients written and summed.
    kl_flops = 4 * 2 * B * T * K * I * J
    return {
        "sparse_mla_decode_paged": (decode, dec_args, 4 * B * N * K * W, B * (K * row_bytes + 2 * N * W * 4)),
        "sparse_mla_fwd": (mla_fwd, q_args, attn, gathered + B * T * (N * W * 6 + K * 8)),
        # backward: recomputed scores, dp, dq, d_rows (2 matmuls): 5 / 2 of the forward, rows read twice
        # (probs' share of the row sum), f32 slot gradients written and summed.
        "sparse_mla_fwd_bwd": (mla_fwd_bwd, q_args, attn * 7 // 2, 3 * gathered + 2 * B * T * K * W * 4),
        "ngram_lookup_fwd": (ngram, (tables, proj), 2 * B * T * G * dim * D,
                             B * T * (G * dim * 2 + D * 2 + G * 4) + G * dim * D * 2),
        "indexer_topk": (topk, index_args, topk_flops, topk_bytes),
        "indexer_kl_fwd_bwd": (kl_fwd_bwd, index_args, kl_flops, 2 * B * T * K * J * (2 + 4)),
    }


# ------------------------------------------------------------------------------------ the footprint table


def _tile_bytes(shape, dtype) -> int:
    """Bytes of a VMEM buffer: last two dims padded to (8 * 32 / bits, 128) tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    dims = [d for d in shape if d is not None] or [1]
    if len(dims) == 1:
        dims = [1] + dims
    sub = 8 * max(1, 4 // itemsize)
    lead = math.prod(dims[:-2])
    return lead * (-(-dims[-2] // sub) * sub) * (-(-dims[-1] // 128) * 128) * itemsize


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
    for sub in jex_core.subjaxprs(jaxpr):
        yield from _pallas_calls(sub)


def footprints(fn, args) -> list[dict]:
    """Per pallas_call of fn traced for TPU: grid, VMEM bytes (pipelined blocks x2 + scratch), SMEM bytes."""
    with impl.lowering_for("tpu"):
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    rows = []
    for eqn in _pallas_calls(jaxpr):
        gm = eqn.params["grid_mapping"]
        vmem = smem = 0
        for bm in gm.block_mappings:
            space = str(bm.block_aval.memory_space)
            shape = [getattr(d, "block_size", None) for d in bm.block_shape]
            size = 2 * _tile_bytes(shape, bm.array_aval.dtype)
            if "smem" in space:
                smem += size
            elif "any" not in space and "hbm" not in space:
                vmem += size
        scratch = eqn.params["jaxpr"].invars[len(eqn.params["jaxpr"].invars) - gm.num_scratch_operands:]
        for v in scratch:
            if "vmem" in str(v.aval):
                vmem += _tile_bytes(v.aval.shape, v.aval.dtype)
        rows.append({"grid": tuple(gm.grid), "vmem": vmem, "smem": smem})
    return rows


# ------------------------------------------------------------------------------------------------ running


def _time(fn, args, reps: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _max_rel_err(a, b) -> float:
    errs = [np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
            / max(float(np.max(np.abs(np.asarray(y, np.float32)))), 1e-6)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(errs)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "longcat_2"))
    parser.add_argument("--T", type=int, default=2048, help="queries and keys per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)
    cfg = getattr(Config, args.preset)()
    on_tpu = jax.default_backend() == "tpu"
    info = None
    if on_tpu:
        from jax.experimental.pallas import tpu as pltpu

        info = pltpu.get_tpu_info()
    results = []
    print("| kernel | grid | VMEM KiB | SMEM KiB | ms | TFLOP/s | GB/s | % of peak | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (make, inputs, flops, nbytes) in cases(cfg, args.T, args.batch).items():
        if args.only and name not in args.only:
            continue
        table = footprints(make("pallas"), inputs)
        grids = ", ".join(str(r["grid"]) for r in table)
        vmem, smem = max(r["vmem"] for r in table) / 1024, max(r["smem"] for r in table) / 1024
        if on_tpu:
            seconds, check = _time(make("pallas"), inputs, args.reps), ""
        else:  # interpreted: a correctness check, not a timing
            with impl.interpreting("tpu"):
                got = jax.jit(make("pallas"))(*inputs)
            seconds = float("nan")
            check = f"rel err {_max_rel_err(got, jax.jit(make('xla'))(*inputs)):.1e}"
        tflops, gbs = flops / seconds / 1e12, nbytes / seconds / 1e9
        peak = ""
        if info is not None:  # the bound that binds: compute or HBM bandwidth
            share = max(flops / info.bf16_ops_per_second, nbytes / info.mem_bw_bytes_per_second) / seconds
            peak = f"{100 * share:.0f}"
        print(f"| {name} | {grids} | {vmem:.0f} | {smem:.1f} | {seconds * 1e3:.3f} | {tflops:.2f} "
              f"| {gbs:.0f} | {peak} | {check} |")
        results.append({"name": name, "grids": grids, "vmem_kib": vmem, "smem_kib": smem, "seconds": seconds,
                        "check": check})
    return results


if __name__ == "__main__":
    main()
