"""longcat-jax: LongCat-2.0 in JAX / Flax NNX.

Public API:
  Config                         the model configuration and its presets
  LongCat, build_model           the model; model(input_ids) -> logits [B, T, V]
  forward, prefill, decode_step  the three explicit modes
  load_hf, save_hf               Hugging Face checkpoints
"""

from longcat_jax.config import Config
from longcat_jax.hf.weights import load_hf, save_hf
from longcat_jax.model.longcat import (
    LongCat,
    Output,
    abstract_model,
    build_model,
    decode_step,
    forward,
    prefill,
)

__all__ = [
    "Config", "LongCat", "Output", "abstract_model", "build_model", "decode_step", "forward", "load_hf",
    "prefill", "save_hf",
]
