"""What the training loop measures about its steps, beside the loss: the steady-state throughput, the
expert-load statistics of an eval interval, and the --profile-steps profiler trace."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np


@dataclasses.dataclass
class Throughput:
    """Tokens per second over the steady steps only: a step that compiled a program is left out."""

    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float):
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def profile_window(args, step: int, start: bool):
    """--profile-steps A:B: a JAX profiler trace from the start of step A to the end of step B."""
    if args.profile_steps is None:
        return
    first, last = args.profile_steps
    if start and step == first:
        jax.profiler.start_trace(os.path.join(args.out, "profile"))
    elif not start and step == last:
        jax.profiler.stop_trace()


def expert_load_stats(load_sum, cfg) -> dict:
    """Expert-load summary over the interval: real experts per token, zero-expert share, imbalance."""
    if load_sum is None:
        return {}
    load = load_sum.astype(np.float64)
    per_layer = load.sum(-1, keepdims=True)
    real = load[:, : cfg.n_routed_experts]
    share = real / np.maximum(real.sum(-1, keepdims=True), 1.0)
    return {
        "real_experts_per_token": float((real.sum(-1) / np.maximum(per_layer[:, 0], 1.0)).mean()
                                        * cfg.moe_topk),
        "zero_expert_share": float(1.0 - real.sum() / max(load.sum(), 1.0)),
        "expert_load_max_over_mean": float((share.max(-1) * cfg.n_routed_experts).mean()),
    }
