"""How a Hugging Face folder stores the routed experts' weights, in each of the layouts met in practice.

Our parameters are `w_gate`, `w_up` [L, E, D, F] and `w_down` [L, E, F, D]. A folder holds them in one of four
layouts, which `detect` tells apart from the tensor names and shapes:

  per_expert            model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight for the E routed experts:
                        what the released checkpoints and transformers >= 5.25's save_pretrained write.
  per_expert_with_zero  the same, plus gate/up tensors for the zero experts e in [E, E + Z), which no forward
                        pass reads: what transformers 5.24 wrote (its fused gate_up was sized by every slot).
  fused                 model.layers.{l}.mlp.experts.gate_up_proj [E, 2F, D] (gate rows first) and .down_proj
                        [E, D, F]: transformers' in-memory tensors, written by save_pretrained(
                        save_original_format=False).
  fused_with_zero       fused, with gate_up_proj sized by every slot [E + Z, 2F, D] (5.24's memory layout).

Loading reads any of them; saving writes `per_expert` unless asked for another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np

from longcat_jax.config import Config

LAYOUTS = {
    "per_expert": "one tensor per routed expert (transformers >= 5.25)",
    "per_expert_with_zero": "one tensor per expert, with unused gate/up tensors for the zero experts "
    "(transformers 5.24)",
    "fused": "fused gate_up_proj / down_proj per layer, routed experts only",
    "fused_with_zero": "fused gate_up_proj / down_proj per layer, gate_up sized with the zero experts",
}
DEFAULT = "per_expert"

_EXPERTS = "model.layers.{l}.mlp.experts"


def check(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"expert layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return layout


def detect(names: Collection[str], shape_of: Callable[[str], tuple[int, ...]], cfg: Config) -> str:
    """The layout of a folder from its tensor names (and one shape); raises if layer 0 has no experts."""
    first = _EXPERTS.format(l=0)
    if f"{first}.gate_up_proj" in names:
        rows = shape_of(f"{first}.gate_up_proj")[0]
        return "fused_with_zero" if rows == cfg.num_slots and cfg.zero_expert_num else "fused"
    if f"{first}.0.gate_proj.weight" in names:
        zero = f"{first}.{cfg.n_routed_experts}.gate_proj.weight" in names
        return "per_expert_with_zero" if zero else "per_expert"
    raise ValueError(f"no expert tensors for layer 0: expected {first}.gate_up_proj (fused) or "
                     f"{first}.0.gate_proj.weight (one tensor per expert)")


def _fused(layout: str) -> bool:
    return layout.startswith("fused")


def _with_zero(layout: str, cfg: Config) -> bool:
    return layout.endswith("_with_zero") and cfg.zero_expert_num > 0


@dataclasses.dataclass(frozen=True)
class FusedEntry:
    """One of our per-expert leaves inside a layer's fused HF tensor, stacked over layers ("l").

    part: 0 (gate) or 1 (up) for the rows [part*F, (part+1)*F) of gate_up_proj [R, 2F, D]; None for down_proj
    [E, D, F]. Only the first E of the R stored experts are ours. Read like `weights.Entry`, through `read`.
    """

    name: str
    part: int | None
    stack: str = "l"

    def hf_names(self, shape) -> list[str]:
        return [self.name.format(l=l) for l in range(shape[0])]

    def read(self, folder, name: str, inner, index) -> np.ndarray:
        """Our [E, D, F] (or [E, F, D]) leaf of one layer at `index`, reading only the experts it covers: a
        device that holds some experts never loads the whole layer."""
        experts = range(*index[0].indices(inner[0]))
        t = folder.get_rows(name, experts.start, experts.stop)[:: experts.step]
        if self.part is not None:
            F = inner[2]
            t = t[:, self.part * F : (self.part + 1) * F]
        return t.swapaxes(1, 2)[(slice(None), *index[1:])]


def entries(layout: str, mlp_entries) -> dict:
    """The `moe` leaves w_gate / w_up / w_down of `weights.tensor_map` in this layout.

    `mlp_entries(prefix, stack)` builds the per-expert (torch Linear) entries.
    """
    if not _fused(layout):
        return mlp_entries(f"{_EXPERTS}.{{e}}", "le")
    gate_up = f"{_EXPERTS}.gate_up_proj"
    return {"w_gate": FusedEntry(gate_up, 0), "w_up": FusedEntry(gate_up, 1),
            "w_down": FusedEntry(f"{_EXPERTS}.down_proj", None)}


def expected_shapes(layout: str, cfg: Config) -> dict[str, tuple[int, ...]]:
    """HF tensors of the experts that no `Entry` describes, with their shapes: the fused tensors (one per
    layer, shared by two of our leaves) and the zero experts' unused gate/up tensors."""
    E, F, D = cfg.n_routed_experts, cfg.expert_ffn_hidden_size, cfg.hidden_size
    out = {}
    for l in range(cfg.num_layers):
        if _fused(layout):
            rows = cfg.num_slots if _with_zero(layout, cfg) else E
            out[f"{_EXPERTS.format(l=l)}.gate_up_proj"] = (rows, 2 * F, D)
            out[f"{_EXPERTS.format(l=l)}.down_proj"] = (E, D, F)
        elif _with_zero(layout, cfg):
            for e in range(E, cfg.num_slots):
                for proj in ("gate_proj", "up_proj"):
                    out[f"{_EXPERTS.format(l=l)}.{e}.{proj}.weight"] = (F, D)
    return out


def hf_tensors(layout: str, cfg: Config, w_gate, w_up, w_down):
    """Yield (HF name, tensor) for the experts of the layouts that `weights.Entry` cannot write, one layer
    at a time: the fused tensors, and zeros for the zero experts' gate/up (present, never read)."""
    F, D = cfg.expert_ffn_hidden_size, cfg.hidden_size
    zero_rows = cfg.zero_expert_num if _with_zero(layout, cfg) else 0
    for l in range(cfg.num_layers):
        prefix = _EXPERTS.format(l=l)
        if _fused(layout):
            gate, up = np.asarray(w_gate[l]).swapaxes(1, 2), np.asarray(w_up[l]).swapaxes(1, 2)  # [E, F, D]
            gate_up = np.concatenate([gate, up], axis=1)
            if zero_rows:
                gate_up = np.concatenate([gate_up, np.zeros((zero_rows, 2 * F, D), gate_up.dtype)])
            yield f"{prefix}.gate_up_proj", np.ascontiguousarray(gate_up)  # safetensors writes the raw buffer
            yield f"{prefix}.down_proj", np.ascontiguousarray(np.asarray(w_down[l]).swapaxes(1, 2))
        else:
            for e in range(cfg.n_routed_experts, cfg.n_routed_experts + zero_rows):
                for proj in ("gate_proj", "up_proj"):
                    yield f"{prefix}.{e}.{proj}.weight", np.zeros((F, D), w_gate.dtype)
