"""The serving step's compiled programs (docs/architecture.md#serving): `paged_step` jitted for a few bucketed
shapes, each compiled once (ahead of traffic by `compile_all`), and the device's greedy pick that chained
decode steps feed on.

A step's shape is (rows B, tokens per row T, page-table width W): rows are a power of two up to
`max_num_seqs`; T is 1 for decode rows, else a prefill chunk's bucket (`chunk_bucket`); W a power of two of
pages holding at least 256 tokens, so that short sequences share one program.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.model.longcat import LongCat, jit_paged_step
from longcat_jax.model.moe import tiled_experts
from longcat_jax.serving.settings import EngineSettings

log = logging.getLogger("longcat_jax.serving")


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The compiled size for n: the next power of two >= max(n, floor), at most cap."""
    return min(cap, 1 << (max(n, floor, 1) - 1).bit_length())


def chunk_bucket(n: int, cap: int, step: int = 32) -> int:
    """The compiled length of a prefill chunk of n tokens: a power of two (>= 8) up to `step`, then a multiple
    of it (a 135-token prompt computes 160 rows, not 256), at most cap."""
    return bucket(n, cap, 8) if n <= step else min(cap, -(-n // step) * step)


@functools.partial(jax.jit, static_argnums=3)
def _argmax_next(logits, tokens, history, vocab_limit: int):
    """The argmax of each row's logits [B, V] (ids below vocab_limit) as the next decode step's tokens [B, 1],
    with that step's n-gram history: the H tokens before it, i.e. this step's shifted by its token."""
    ids = jnp.arange(logits.shape[-1])
    choice = jnp.argmax(jnp.where(ids < vocab_limit, logits, -jnp.inf), -1).astype(jnp.int32)[:, None]
    if history is not None:
        history = jnp.concatenate([history[:, 1:], tokens[:, -1:]], 1)
    return choice, history


class StepPrograms:
    """The step programs of one engine: its cache (for the shapes the programs take), and vocab_limit (ids at
    or above it are never picked; None = the model's vocabulary)."""

    def __init__(self, model: LongCat, settings: EngineSettings, cache, vocab_limit: int | None = None):
        self.settings = settings
        self.vocab_limit = vocab_limit or model.cfg.vocab_size
        self.history_len = (model.cfg.ngram_n or 1) - 1  # N-gram history tokens per row (0: no N-grams)
        self.n_experts, self.topk = model.cfg.n_routed_experts, model.cfg.moe_topk
        self._step, self._params = jit_paged_step(model, settings.unroll_layers)
        self._cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                   cache)
        self._programs: dict[tuple[int, int, int], Callable] = {}  # (B, T, W) -> compiled step

    def __len__(self) -> int:
        """Programs compiled so far."""
        return len(self._programs)

    def shape(self, rows: int, tokens: Sequence[int], pages: int) -> tuple[int, int, int]:
        """The (B, T, W) of a step of `rows` rows feeding `tokens` tokens each, over at most `pages` pages."""
        s = self.settings
        T = 1 if all(n == 1 for n in tokens) else chunk_bucket(max(tokens), s.prefill_chunk)
        return bucket(rows, s.max_num_seqs), T, self._width(pages)

    def _width(self, pages: int) -> int:
        s = self.settings
        return bucket(pages, s.pages_per_seq, -(-min(256, s.max_model_len) // s.page_size))

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """Every (B, T, W) a step can run: decode rows (T = 1) and one prefill chunk, at each width."""
        s = self.settings
        widths = sorted({self._width(n) for n in range(1, s.pages_per_seq + 1)})
        rows = sorted({bucket(n, s.max_num_seqs) for n in range(1, s.max_num_seqs + 1)})
        chunk = range(2, min(s.prefill_chunk, s.max_model_len) + 1)
        chunks = sorted({chunk_bucket(n, s.prefill_chunk) for n in chunk})
        return [(B, 1, W) for W in widths for B in rows] + [(1, T, W) for W in widths for T in chunks]

    def compile_all(self, cache, workers: int = 2):
        """Compile every program of `bucket_shapes` now and run it (`_warm_up_inputs`), so that no request
        waits for either (a new bucket met mid-traffic stalls every running stream); returns the cache, which
        the runs donate and leave as it was. XLA compiles in C++, so threads overlap one program's Python
        tracing with another's compile.

        The run matters as much as the compile: an XLA:CPU program's first execution sets up its kernels,
        130-230 ms more than later ones on the serving benchmark's model. A decode program's logits go to
        `argmax_next`, which is thus compiled for the program's committed output and for both kinds of tokens
        it is given: the host's and its own earlier pick.
        """
        t = time.perf_counter()
        todo = [shape for shape in self.bucket_shapes() if shape not in self._programs]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for shape, program in zip(todo, pool.map(self._compile, todo)):
                self._programs[shape] = program
        rng = np.random.default_rng(0)
        for shape in todo:
            for tokens, new_lens, table, history in self._warm_up_inputs(shape, rng):
                logits, cache = self.run(shape, tokens, np.zeros(shape[0], np.int32), new_lens, table, cache,
                                         history)
            if shape[1] == 1:  # both ways a step asks for the pick: after host tokens, and on its own
                self.argmax_next(logits, *self.argmax_next(logits, tokens, history))
        jax.block_until_ready(cache)
        log.info("compiled and ran %d step programs ahead of traffic in %.1f s", len(todo),
                 time.perf_counter() - t)
        return cache

    def _warm_up_inputs(self, shape: tuple[int, int, int], rng):
        """(tokens, new_lens, page table, history) of each warm-up run of a program; no run writes a row.

        One run with no real token and every page in the pool, except where each expert's matmuls sit in a
        branch of their own (`moe.tiled_experts`: XLA:CPU), whose kernels are set up at that branch's first
        execution (~1 ms a matmul): there the rows are real (random tokens) and their page tables point past
        the pool, so every row is computed, XLA clamps the page reads and the writes are dropped
        (`paged_cache.write_rows`), in enough runs for about 8 picks of each expert (at most 32). On GPU and
        TPU a page past the pool could be read out of bounds by a kernel, and the experts are one grouped
        matmul.
        """
        B, T, W = shape
        H = self.history_len
        if not tiled_experts():
            history = np.zeros((B, H), np.int32) if H else None
            yield np.zeros((B, T), np.int32), np.zeros(B, np.int32), np.zeros((B, W), np.int32), history
            return
        for _ in range(max(1, min(32, -(-8 * self.n_experts // (B * T * self.topk))))):
            history = rng.integers(0, self.vocab_limit, (B, H), dtype=np.int32) if H else None
            yield (rng.integers(0, self.vocab_limit, (B, T), dtype=np.int32), np.full(B, T, np.int32),
                   np.full((B, W), self.settings.pool_pages, np.int32), history)

    def _compile(self, shape: tuple[int, int, int]):
        B, T, W = shape
        H = self.history_len
        ints = [jax.ShapeDtypeStruct(x, jnp.int32) for x in ((B, T), (B,), (B,), (B, W), (B, H))]
        return self._step.lower(self._params, *ints[:4], self._cache, ints[4] if H else None).compile()

    def program(self, shape: tuple[int, int, int]) -> Callable:
        """The compiled step for shape, compiled now if it was not."""
        if shape not in self._programs:
            log.info("compiling the step for %d rows x %d tokens, %d pages per row (program %d)", *shape,
                     len(self._programs) + 1)
            self._programs[shape] = self._compile(shape)
        return self._programs[shape]

    def run(self, shape, tokens, starts, new_lens, table, cache, history):
        """`paged_step` at shape (the cache is donated): (logits [B, V], the new cache)."""
        return self.program(shape)(self._params, tokens, starts, new_lens, table, cache, history)

    def argmax_next(self, logits, tokens, history):
        """The device's greedy pick of each row (`_argmax_next`), dispatched, not read."""
        return _argmax_next(logits, tokens, history, self.vocab_limit)
