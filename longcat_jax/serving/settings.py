"""How an engine is sized: its running batch, context length, cache pages, prefill chunk and queue."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int = 32  # requests in the running batch
    max_model_len: int = 2048  # prompt + output tokens of one request
    page_size: int = 16  # tokens per cache page
    num_pages: int | None = None  # the pool; None = room for max_num_seqs requests of max_model_len tokens
    prefill_chunk: int = 256  # prompt tokens per step, over all prefilling requests
    max_waiting: int = 256  # queued requests beyond which `submit` raises QueueFull
    unroll_layers: bool | None = None  # per-layer weight arrays, layers unrolled; None = on CPU only

    def checked(self) -> EngineSettings:
        for name in ("max_num_seqs", "max_model_len", "page_size", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < self.pages_per_seq:
            raise ValueError(f"num_pages={self.num_pages} cannot hold one request of max_model_len="
                             f"{self.max_model_len} tokens ({self.pages_per_seq} pages of {self.page_size})")
        return self

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    @property
    def pool_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.max_num_seqs * self.pages_per_seq
