"""Logical axis names and the one table that maps them to mesh axes (docs/architecture.md#logical-axes).

Logical names (what a parameter or activation axis indexes):
  batch          sequences in a batch
  seq            token positions
  embed          model width D
  heads          attention heads N
  head_dim       per-head width H
  q_lora         MLA query latent rank
  kv_lora        MLA key/value latent rank (plus rope dims where fused)
  mlp            dense SwiGLU width F
  experts        routed experts E
  expert_mlp     per-expert SwiGLU width
  slots          router outputs (routed plus zero experts)
  vocab          vocabulary rows of the token embedding and LM head
  ngram_rows     rows of the concatenated N-gram tables
  ngram_branch   N-gram branches G
  ngram_dim      width of one N-gram table
  indexer_heads  lightning-indexer heads
  layers         stacked decoder layers

Mesh axes are short parallelism abbreviations: dp, pp, cp, ep, tp and vp (embedding-parallel for the
N-gram tables). Model code names only logical axes; this file is the only bridge.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

LOGICAL_AXES = (
    "batch", "seq", "embed", "heads", "head_dim", "q_lora", "kv_lora", "mlp", "experts", "expert_mlp",
    "slots", "vocab", "ngram_rows", "ngram_branch", "ngram_dim", "indexer_heads", "layers",
)

MESH_AXES = ("dp", "pp", "cp", "ep", "tp", "vp")

# Default training rules: tensor parallel over heads/FFN/vocab, experts over ep, N-gram rows over vp.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", "dp"),
    ("seq", "cp"),
    ("embed", None),
    ("heads", "tp"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tp"),
    ("experts", "ep"),
    ("expert_mlp", "tp"),
    ("slots", None),
    ("vocab", "tp"),
    ("ngram_rows", "vp"),
    ("ngram_branch", None),
    ("ngram_dim", None),
    ("indexer_heads", None),
    ("layers", "pp"),
)


def logical_to_spec(names: tuple[str | None, ...], rules=RULES, mesh_axes=MESH_AXES) -> PartitionSpec:
    """Resolve logical names to a PartitionSpec; raise on unknown names or a mesh axis used twice."""
    table = dict(rules)
    out, used = [], set()
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(table)}")
        axes = table[name]
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a in mesh_axes)
        for a in axes_t:
            if a in used:
                raise ValueError(f"mesh axis {a!r} used twice in {names}")
            used.add(a)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*out)


def override_rules(text: str, rules=RULES) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """A variant of the table from 'logical=axes' overrides (docs/architecture.md#logical-axes).

    'experts=ep+cp,batch=dp+ep,vocab=none' maps experts to (ep, cp), batch to (dp, ep) and leaves vocab
    unsharded; every other name keeps its entry. Variants are small overrides of the one table, never new
    tables, so a reader diffs them against RULES. Unknown logical names and unknown mesh axes raise.
    """
    table = dict(rules)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"rule override {part!r} is not 'logical=axes'")
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r} in {text!r}; known: {', '.join(table)}")
        axes = () if value in ("", "none", "None") else tuple(a.strip() for a in value.split("+"))
        for a in axes:
            if a not in MESH_AXES:
                raise ValueError(f"unknown mesh axis {a!r} for {name!r} in {text!r}; "
                                 f"known: {', '.join(MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh axis repeated for {name!r} in {text!r}")
        table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


def split_axis(name: str, rules, mesh, purpose: str) -> str | None:
    """The one mesh axis that logical axis `name` is split over on `mesh`, when that axis has more than one
    device; None on an empty mesh, when `name` is unsharded or its axis has one device. Raises ValueError when
    `name` maps to several mesh axes (`purpose` says what needs a single one)."""
    if mesh.empty:
        return None
    axis = logical_to_spec((name,), rules, mesh.axis_names)[0]
    if axis is None:
        return None
    if not isinstance(axis, str):
        raise ValueError(f"{purpose} over one mesh axis; `{name}` maps to {axis}")
    return axis if mesh.shape[axis] > 1 else None
