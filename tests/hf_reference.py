"""Builders for random transformers reference models, saved to a folder the way real checkpoints are."""

from __future__ import annotations

import jax
import torch
from flax import nnx
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

SMALL_FLASH = dict(
    vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=16, ffn_hidden_size=96,
    expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, moe_topk=3, routed_scaling_factor=2.5,
)


def random_flash(seed: int = 0, **changes) -> LongcatFlashForCausalLM:
    """A random LongcatFlashForCausalLM with non-trivial norms and router bias (defaults would hide bugs)."""
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(LongcatFlashConfig(**{**SMALL_FLASH, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    return model


def causal_mask(T: int) -> torch.Tensor:
    """Additive [1, 1, T, T] causal mask for HF eager attention."""
    return torch.triu(torch.full((T, T), float("-inf")), 1)[None, None]


def layer_of(model, index: int):
    """Decoder layer `index` of our stacked layers, as a standalone module."""
    graphdef, state = nnx.split(model.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))
