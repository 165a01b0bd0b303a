"""The loss and the jit-compiled training step (docs/architecture.md#losses).

Loss terms, each reported on its own:
  ce            next-token cross-entropy over real targets (loss_mask)
  z_loss        coef * mean(logsumexp(logits)^2), keeps the softmax normaliser near 0
  mtp           mean over the S draft depths of the CE of token t+k+1 at position t, inside one document
  indexer_kl    the indexers' KL to the attention they serve (detached inputs: it trains the indexers only)
  balance       the small load-balance loss with zero experts as one group
The router correction bias is not trained by gradients: after each step it moves towards the target share of
real-expert assignments (aux-loss-free balancing, docs/architecture.md#balance); zero-expert biases stay
frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.longcat import forward
from longcat_jax.training.lm_loss import lm_head_stats, stats_from_logits
from longcat_jax.training.reliability import (
    GuardState,
    abft_check,
    flip_bit,
    guard_check,
    high_bit,
    inject_nan,
    select_tree,
    weight_checksum,
)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    mtp_weight: float = 0.3
    z_loss: float = 1e-4
    indexer_weight: float = 1.0
    balance_weight: float = 1e-3
    bias_update_rate: float = 1e-3  # mu of the aux-loss-free bias update
    abft: bool = False  # checksum-verify the LM-head matmul; a mismatch skips the step
    spike_factor: float = 3.0
    guard_warmup: int = 20


@flax.struct.dataclass
class TrainState:
    params: Any  # nnx.State of the model's parameters
    opt_state: Any
    step: jax.Array  # int32 scalar: updates applied so far (skipped steps count too)
    guard: GuardState


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1.0)


def _masked_ce(logits, targets, mask):
    lse, target_logit = stats_from_logits(logits, targets)
    return _masked_mean(lse - target_logit, mask)


def mtp_targets(batch, k: int):
    """Targets and mask of draft depth k (0-based): position t predicts inputs[t+k+1] = targets[t+k], valid
    when t+k is inside the row, in the same document, and itself has a real target."""
    T = batch["targets"].shape[1]
    tgt = jnp.pad(batch["targets"][:, k:], ((0, 0), (0, k)))
    seg = batch["segment_ids"]
    same = jnp.pad(seg[:, k:], ((0, 0), (0, k))) == seg
    ok = jnp.pad(batch["loss_mask"][:, k:], ((0, 0), (0, k))) * batch["loss_mask"]
    inside = (jnp.arange(T) < T - k)[None, :]
    return tgt, ok * same * inside


def compute_loss(params, graphdef, batch, cfg: Config, settings: LossSettings, *, dense_attention=False,
                 measure_recall=False, remat=None, fault_flip=False, microbatches=1):
    """Total loss and its terms for one batch (dict of [B, T] arrays from longcat_jax.training.data).

    The terms hold indexer_recall in the dense warm-up, and in the sparse stage with measure_recall (static,
    see `forward`). microbatches: the pipeline's split of the batch (`forward`).
    """
    model = nnx.merge(graphdef, params)
    out = forward(model, batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"],
                  collect_aux=True, dense_attention=dense_attention, measure_recall=measure_recall,
                  remat=remat, microbatches=microbatches)
    mask = batch["loss_mask"]
    if settings.abft:
        # Recompute the LM-head matmul (the forward's own logits are then dead code) and verify it against the
        # column checksum of w. The fault hook flips a high bit of one logit after the matmul, as a silent
        # data corruption would, and the checksum must catch it.
        h = model.final_norm(out.hidden)
        w = model.lm_head[...].astype(h.dtype)
        logits = jnp.einsum("btd,dv->btv", h, w)
        flipped = jax.lax.stop_gradient(flip_bit(logits, 0, high_bit(logits.dtype)))
        logits = jnp.where(fault_flip, flipped, logits)
        mismatch = abft_check(h, logits, weight_checksum(w))
        lse, target_logit = stats_from_logits(logits, batch["targets"])
    else:  # the forward's logits are dead code here too: the fused head computes what the loss needs
        lse, target_logit = lm_head_stats(model.final_norm(out.hidden), model.lm_head[...], batch["targets"])
        mismatch = jnp.array(False)
    ce, z = _masked_mean(lse - target_logit, mask), _masked_mean(lse**2, mask)
    terms = {"ce": ce, "z_loss": z}
    total = ce + settings.z_loss * z
    if out.mtp_logits is not None:
        mtp = 0.0
        for k in range(cfg.mtp_num_steps):
            tgt, ok = mtp_targets(batch, k + 1)
            mtp = mtp + _masked_ce(out.mtp_logits[k], tgt, ok) / cfg.mtp_num_steps
        terms["mtp"] = mtp
        total = total + settings.mtp_weight * mtp
    if cfg.use_indexer:
        kl = out.aux["indexer_kl"] + out.aux.get("mtp_indexer_kl", 0.0)
        terms["indexer_kl"] = kl
        if "indexer_recall" in out.aux:
            terms["indexer_recall"] = jax.lax.stop_gradient(out.aux["indexer_recall"])
        total = total + settings.indexer_weight * kl
    terms["balance"] = out.aux["balance_loss"]
    total = total + settings.balance_weight * out.aux["balance_loss"]
    terms["loss"] = total
    return total, (terms, out.aux["expert_load"], mismatch)


def update_router_bias(params, expert_load, cfg: Config, rate: float):
    """Aux-loss-free balancing: b_i += mu * (target share - actual share) for real experts
    (docs/architecture.md#balance).

    expert_load [L, slots]: top-k assignments per slot. The target spreads the expected real-expert picks
    (cfg.expected_real_experts, else the uniform share) evenly over the E experts; zero-expert biases stay.
    """
    E, K = cfg.n_routed_experts, cfg.moe_topk
    k_real = cfg.expected_real_experts or K * E / cfg.num_slots
    load = expert_load.astype(jnp.float32)
    share = load[:, :E] / jnp.maximum(load.sum(-1, keepdims=True), 1.0)  # T_i / (K T_all)
    delta = rate * (k_real / K / E - share)

    def update(path, x):
        if jax.tree_util.keystr(path).startswith("['layers']['moe']['bias']"):
            return x.at[:, :E].add(delta.astype(x.dtype))
        return x

    return jax.tree_util.tree_map_with_path(update, params)


def accumulated_grads(params, batch, grad_accum: int, **loss_kwargs):
    """Gradients and loss terms of `batch` over `grad_accum` micro-batches run one after another (a scan):
    the mean of the micro-batches' gradients and terms, their expert loads summed, any ABFT mismatch.

    Micro-batch a takes rows a, a + N, a + 2N, ... (N = grad_accum), so a batch sharded over dp in contiguous
    blocks gives each device its own rows in every micro-batch. The mean equals the whole batch's gradient
    when the micro-batches hold equally many real targets (packed training rows do, up to their EOS
    positions); the balance loss is the one term computed per micro-batch, as in any accumulation."""
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    if grad_accum == 1:
        (_, aux), grads = grad_fn(params, batch=batch, **loss_kwargs)
        return grads, aux
    n = grad_accum
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)

    def one(acc, mb):
        (_, (terms, load, mismatch)), grads = grad_fn(params, batch=mb, **loss_kwargs)
        sums, load_sum, any_mismatch = acc
        return (jax.tree.map(jnp.add, sums, (grads, terms)), load_sum + load, any_mismatch | mismatch), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda mb: grad_fn(params, batch=mb, **loss_kwargs), first)
    (_, (terms0, load0, _)), grads0 = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ((grads0, terms0), load0))
    (sums, load, mismatch), _ = jax.lax.scan(one, (*zeros, jnp.array(False)), micro)
    grads, terms = jax.tree.map(lambda x: x / grad_accum, sums)
    return grads, (terms, load, mismatch)


def train_step(state: TrainState, batch, *, graphdef, cfg: Config, optimizer, settings: LossSettings,
               dense_attention=False, measure_recall=False, remat=None, nan_fault_step=-1, flip_fault_step=-1,
               host_opt_shardings=None, grad_accum=1, microbatches=1):
    """One update: gradients, guard (NaN / spike / ABFT), optimizer, router-bias balancing.

    host_opt_shardings: the optimizer state lives in host memory (these are its shardings); it is copied to
    device memory for the update and the new state is written back to the host (optimizer-state offload).
    grad_accum: micro-batches per step (`accumulated_grads`). microbatches: the pipeline's split of each of
    them over the stacked layers' mesh axis (`forward`).

    Returns (new state, metrics dict of scalars, expert_load [L, slots]). A bad step keeps the old parameters
    and optimizer state; the step counter still advances so the data stream stays aligned.
    """
    grads, (terms, load, mismatch) = accumulated_grads(
        state.params, batch, grad_accum, graphdef=graphdef, cfg=cfg, settings=settings,
        dense_attention=dense_attention, measure_recall=measure_recall, remat=remat,
        fault_flip=state.step == flip_fault_step, microbatches=microbatches)
    grads = inject_nan(grads, where=state.step == nan_fault_step)
    grad_norm = optax.global_norm(grads)
    loss = jnp.where(mismatch, jnp.nan, terms["loss"])  # an SDC makes the step as untrustworthy as a NaN
    ok, guard = guard_check(state.guard, loss, grad_norm, settings.spike_factor, settings.guard_warmup)
    old_opt_state = state.opt_state
    if host_opt_shardings is not None:
        old_opt_state = jax.device_put(old_opt_state, jax.tree.map(lambda s: s.with_memory_kind("device"),
                                                                   host_opt_shardings))
    updates, opt_state = optimizer.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_router_bias(params, load, cfg, settings.bias_update_rate)
    params, opt_state = select_tree(ok, (params, opt_state), (state.params, old_opt_state))
    if host_opt_shardings is not None:
        opt_state = jax.device_put(opt_state, host_opt_shardings)
    metrics = dict(terms, grad_norm=grad_norm, skipped=~ok, abft_mismatch=mismatch)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1, guard=guard), metrics, load


def eval_loss(params, graphdef, batch):
    """Mean next-token CE over real targets (no MTP / auxiliary terms)."""
    model = nnx.merge(graphdef, params)
    out = forward(model, batch["inputs"], batch["positions"], with_mtp=False,
                  segment_ids=batch["segment_ids"])
    return _masked_ce(out.logits, batch["targets"], batch["loss_mask"]), batch["loss_mask"].sum()
