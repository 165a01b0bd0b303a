"""Compile every Pallas kernel to PTX for an H100/H200 (sm_90) on a machine without a GPU.

    pip install triton==3.9.0   # not a project dependency (1 GB); any machine, no GPU needed
    python bench/triton_ptx.py [--preset small] [--seq-len 512] [--json bench/results/triton_ptx.json]

For each case of `bench/gpu_cases.py` (forward and backward) the kernels are lowered as on a GPU
(`impl.lowering_for("gpu")`, Pallas' Triton lowering), the Triton IR of each pallas_call is compiled by the
`triton` package for sm_90 with the kernels' launch parameters; the ptxas triton uses reports registers and
spills. A kernel fails when Triton rejects it or when its shared memory exceeds what one H200 block may use
(227 KiB), which would only show at launch. This is what can be checked without a device; running the
kernels (and their speed) is `bench/gpu_kernels.py` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from gpu_cases import CASES, kernel_cases
from jax._src.pallas.triton import lowering as triton_lowering

from longcat_jax.config import Config
from pallas_kernels import impl

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on H100 / H200


def triton_modules(fn, args):
    """(Triton IR text, num_warps, num_stages) of every pallas_call in jit(fn), from Pallas' own lowering. jax
    0.10.2 internals: the module Pallas builds is serialised to bytecode inside the custom call, so it is
    captured here; the launch parameters are read from the custom calls, in the same order."""
    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = original(*a, **kw)
        captured.append(result.module.operation.get_asm())
        return result

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        with impl.lowering_for("gpu"):
            hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    warps = [int(n) for n in re.findall(r"num_warps = (\d+) : i32", hlo)]
    stages = [int(n) for n in re.findall(r"num_stages = (\d+) : i32", hlo)]
    return list(zip(captured, warps, stages, strict=True))


def ptxas_report(ptxas: Path, ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.ptx")
        path.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def compile_module(text: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.ttir")
        path.write_text(text)
        start = time.perf_counter()
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        seconds = time.perf_counter() - start
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas triton itself used (the package ships two)
    name = re.search(r"tt\.func public @(\w+)", text).group(1)
    report = {"kernel": name, "num_warps": num_warps, "compile_s": round(seconds, 1),
              "shared_bytes": kernel.metadata.shared,
              "ptx_kb": round(len(kernel.asm["ptx"]) / 1024)}
    report.update(ptxas_report(ptxas, kernel.asm["ptx"]))
    report["ok"] = kernel.metadata.shared <= SM90_SHARED_LIMIT
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=Config.PRESETS)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        parser.error("needs the triton package: pip install triton==3.9.0")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # compile every kernel afresh: honest compile_s
    cases = kernel_cases(Config.preset(args.preset), T=args.seq_len)
    rows = []
    for name in args.cases.split(","):
        fn, fn_args, _ = cases[name]
        for text, num_warps, num_stages in triton_modules(fn, fn_args):
            try:
                row = {"case": name, **compile_module(text, num_warps, num_stages)}
            except Exception as err:  # report and go on: one bad kernel should not hide the others
                row = {"case": name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        meta = {"preset": args.preset, "seq_len": args.seq_len, "target": "cuda sm_90 (H100/H200)",
                "jax": jax.__version__, "triton": sys.modules["triton"].__version__,
                "date": time.strftime("%Y-%m-%d"),
                "command": "python bench/triton_ptx.py " + " ".join(argv or sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1) + "\n")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} kernels compiled for sm_90 within the shared-memory limit")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
