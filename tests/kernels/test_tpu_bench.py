"""bench/tpu_kernels.py, checked on CPU: its footprint table reads the kernels' grids and VMEM from the TPU
lowering, and its interpreter run agrees with the XLA path at a small size."""

from __future__ import annotations

from bench import tpu_kernels
from longcat_jax.config import Config


def test_footprint_table_reads_grid_and_vmem():
    cfg = Config.tiny()
    make, inputs, _, _ = tpu_kernels.cases(cfg, T=16, batch=2)["sparse_mla_decode_paged"]
    (row,) = tpu_kernels.footprints(make("pallas"), inputs)
    W = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert row["grid"] == (2,)  # one program per sequence
    # At least the two [16 slots, W] bf16 DMA buffers (16 sublanes x 128 lanes each) and the f32 output.
    assert row["vmem"] >= 2 * 16 * 128 * 2 + 2 * cfg.num_heads * max(W, 128) * 4 and row["smem"] > 0


def test_interpreted_run_checks_against_xla():
    (result,) = tpu_kernels.main(["--preset", "tiny", "--T", "16", "--only", "sparse_mla_decode_paged"])
    assert result["check"].startswith("rel err") and float(result["check"].split()[-1]) < 1e-2
