"""Double-buffered DMA row gathers for the Mosaic (TPU) kernels (docs/architecture.md#sparse-attention).

A TPU kernel cannot index a VMEM ref with a vector of row numbers (the Triton kernels' `kv_ref[rows, :]`),
and a BlockSpec fetches one block per grid step, not K scattered rows. So the selected rows stay in HBM
(`memory_space=pl.ANY`) and the kernel copies them itself: one `pltpu.make_async_copy` per row, its row
number read as a scalar from SMEM, into a VMEM buffer of `block` rows. Two such buffers alternate: while the
kernel computes on chunk c, the copies of chunk c + 1 are already in flight, so HBM latency hides behind the
MXU work (the technique of jax's TPU paged-attention kernels, applied to single rows).

Every slot of a chunk is copied, a slot without a row (-1, out of range) from row 0 instead: the buffer then
never holds uninitialised memory (a NaN there would survive a zero probability, 0 * NaN = NaN), and the
caller masks such slots' scores. One DMA semaphore per buffer counts the chunk's copies; waiting on each copy
descriptor of a chunk consumes exactly what its starts signalled.

Helpers here are called inside a Mosaic kernel: scalar arithmetic only on SMEM values, `lax.div`/`lax.rem`
(jnp's `//` and `%` lower through `sign`, whose Mosaic rule asks which TPU it runs on, which fails on a CPU
host that only lowers).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Where slot k of the selection comes from, as scalars: (which of the source refs, row number in it).
Locate = Callable[[jax.Array], tuple[jax.Array | int, jax.Array]]


def double_buffer_shapes(block: int, width: int, dtype) -> list:
    """Scratch for `stream_rows`: two [block, width] VMEM buffers and their two DMA semaphores."""
    return [pltpu.VMEM((2, block, width), dtype), pltpu.SemaphoreType.DMA((2,))]


def _row_copy(src_ref, row, buf_ref, sems, slot, j):
    return pltpu.make_async_copy(src_ref.at[pl.ds(row, 1)], buf_ref.at[slot, pl.ds(j, 1)], sems.at[slot])


def _start_chunk(srcs, locate: Locate, buf_ref, sems, chunk, slot):
    block = buf_ref.shape[1]

    @pl.loop(0, block)
    def _(j):
        which, row = locate(chunk * block + j)
        if len(srcs) == 1:
            _row_copy(srcs[0], row, buf_ref, sems, slot, j).start()
            return
        for i, src_ref in enumerate(srcs):  # the source is data-dependent: one guarded start per candidate

            @pl.when(which == i)
            def _(src_ref=src_ref):
                _row_copy(src_ref, row, buf_ref, sems, slot, j).start()


def _wait_chunk(srcs, buf_ref, sems, slot):
    # A wait needs only the destination's size and the semaphore: every copy of a chunk moves one row.
    @pl.loop(0, buf_ref.shape[1])
    def _(j):
        _row_copy(srcs[0], 0, buf_ref, sems, slot, j).wait()


def stream_rows(srcs, locate: Locate, buf_ref, sems, num_chunks: int, body, init):
    """fori_loop over chunks of `block` selected rows, each fetched by DMA while the previous one computes.

    srcs: HBM refs [rows, width] (same width and dtype as the buffer); locate(k) names slot k's source as
    scalars (index into srcs, row). body(c, rows [block, width], carry) -> carry runs once chunk c is in VMEM.
    Returns the final carry.
    """
    _start_chunk(srcs, locate, buf_ref, sems, 0, 0)

    def step(c, carry):
        slot = jax.lax.rem(c, 2)

        @pl.when(c + 1 < num_chunks)
        def _():  # the next chunk's copies overlap this chunk's compute
            _start_chunk(srcs, locate, buf_ref, sems, c + 1, 1 - slot)

        _wait_chunk(srcs, buf_ref, sems, slot)
        return body(c, buf_ref[slot], carry)

    return jax.lax.fori_loop(0, num_chunks, step, init)


def safe_row(row, num_rows):
    """`row` when it names a row of a table of `num_rows`, else row 0 (a finite row the caller masks)."""
    return jnp.where((row >= 0) & (row < num_rows), row, 0)


__all__ = ["Locate", "double_buffer_shapes", "safe_row", "stream_rows"]
