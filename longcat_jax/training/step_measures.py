"""What the training loop measures about its steps, beside the loss: the steady-state throughput, the
expert-load statistics of an eval interval, and the --profile-steps profiler trace."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np


@dataclasses.dataclass
class Throughput:
    """Tokens per second and model-FLOPs utilisation over the steady steps only: a step that compiled a
    program is left out. `peak` is the devices' measured matmul rate (FLOP/s, all devices together)."""

    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    flops: float = 0.0
    peak: float = 0.0

    def add(self, tokens: int, seconds: float, flops: float = 0.0):
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1
        self.flops += flops

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mfu(self) -> float:
        """Model FLOP/s (`model_flops.step_flops`) over the measured matmul rate."""
        return self.flops / self.seconds / self.peak if self.seconds and self.peak else 0.0


def measured_peak(mesh, dtype) -> float:
    """The matmul rate of the run's devices in its compute dtype (the best of three square products on one
    device, times the device count): what MFU is measured against, so it reads as a share of what this
    machine really does rather than of a datasheet figure. Accelerators get 8192-wide products, large enough
    to hide launch overhead; a CPU reaches its rate at 1024 in a fraction of a second."""
    from longcat_jax.training.matmul_rate import matmul_rates

    devices = mesh.size if mesh is not None else 1
    n = 1024 if jax.default_backend() == "cpu" else 8192
    return max(matmul_rates(n, 3, dtype)) * devices


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
