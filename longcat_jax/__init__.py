"""longcat-jax: LongCat-2.0 in JAX / Flax NNX.

Public API:
  Config                         the model configuration and its presets
  LongCat, build_model           the model; model(input_ids) -> logits [B, T, V]
  forward, prefill, decode_step  the three explicit modes
  generate                       greedy continuation through prefill and decode_step
  load_hf, save_hf               Hugging Face checkpoints

The names resolve on first use: importing a sub-package (the shared math in `ops`, say, which the kernels
import) does not load the model, so the kernels never import back into the model that imports them.
"""

import importlib

from longcat_jax.config import Config

_WHERE = {
    "LongCat": "longcat_jax.model.longcat", "Output": "longcat_jax.model.longcat",
    "abstract_model": "longcat_jax.model.longcat", "build_model": "longcat_jax.model.longcat",
    "decode_step": "longcat_jax.model.longcat", "forward": "longcat_jax.model.longcat",
    "prefill": "longcat_jax.model.longcat", "generate": "longcat_jax.model.generate",
    "load_hf": "longcat_jax.hf.weights", "save_hf": "longcat_jax.hf.weights",
}

__all__ = ["Config", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'longcat_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(__all__)
