"""Hugging Face safetensors checkpoints in and out (docs/architecture.md#hf-checkpoints).

One table (`tensor_map`) says, for every parameter of our model, which HF tensors hold it and how: per-layer
and per-expert tensors are stacked on our leading axes, torch Linear weights [out, in] are transposed to our
[in, out], the G N-gram tables are concatenated by rows. Loading and saving both read that table. The routed
experts come in four layouts (`expert_layout`): loading detects and reads any of them, saving writes the one
asked for.

Tensors stream: each parameter is built with `jax.make_array_from_callback`, which reads (memory-mapped) only
the HF tensors of the shard a device asks for, so host memory holds at most one parameter shard at a time.
Saving pulls one layer or expert slice at a time and flushes a file whenever it reaches `max_shard_bytes`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from longcat_jax.config import Config
from longcat_jax.hf import expert_layout
from longcat_jax.hf.config import FLASH, LITE, LONGCAT2, architecture_of, config_from_hf, config_to_hf
from longcat_jax.model.longcat import LongCat, abstract_model
from longcat_jax.ops.ngram_hash import table_offsets
from sharding.divisibility import check_divisible
from sharding.rules import RULES, logical_to_spec

INDEX_FILE = "model.safetensors.index.json"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one of our parameters is stored in the HF layout.

    name: HF tensor name; `{l}`, `{e}`, `{g}` are filled with the indices of our leading stacked axes.
    stack: the letters of our leading axes that index separate HF tensors ("" for none).
    linear_in: for a torch Linear weight, how many of our trailing axes form its input (0 = stored as is).
    """

    name: str
    stack: str = ""
    linear_in: int = 0

    def hf_names(self, shape) -> list[str]:
        ranges = [range(n) for n in shape[: len(self.stack)]]
        return [self.name.format(**dict(zip(self.stack, idx))) for idx in itertools.product(*ranges)]

    def to_ours(self, t: np.ndarray, shape) -> np.ndarray:
        if self.linear_in:
            t = t.T
        return t.reshape(shape)

    def read(self, folder: SafetensorsFolder, name: str, inner, index) -> np.ndarray:
        """Our leaf's slice at `index` (of its `inner` shape) from the HF tensor `name`."""
        return self.to_ours(folder.get(name), inner)[index]

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.linear_in:
            n_in = int(np.prod(x.shape[: self.linear_in]))
            return np.ascontiguousarray(x.reshape(n_in, -1).T)
        return x


def _mla(prefix: str, stack: str) -> dict:
    return {
        "w_q_down": Entry(f"{prefix}.q_a_proj.weight", stack, 1),
        "q_norm": Entry(f"{prefix}.q_a_layernorm.weight", stack),
        "w_q_up": Entry(f"{prefix}.q_b_proj.weight", stack, 1),
        "w_kv_down": Entry(f"{prefix}.kv_a_proj_with_mqa.weight", stack, 1),
        "kv_norm": Entry(f"{prefix}.kv_a_layernorm.weight", stack),
        "w_kv_up": Entry(f"{prefix}.kv_b_proj.weight", stack, 1),
        "w_o": Entry(f"{prefix}.o_proj.weight", stack, 2),
    }


def _indexer(prefix: str, stack: str) -> dict:
    return {
        "wq_b": Entry(f"{prefix}.wq_b.weight", stack, 1),
        "wk": Entry(f"{prefix}.wk.weight", stack, 1),
        "k_norm": Entry(f"{prefix}.k_norm.weight", stack),
        "weights_proj": Entry(f"{prefix}.weights_proj.weight", stack, 1),
    }


def _mlp(prefix: str, stack: str) -> dict:
    return {
        "w_gate": Entry(f"{prefix}.gate_proj.weight", stack, 1),
        "w_up": Entry(f"{prefix}.up_proj.weight", stack, 1),
        "w_down": Entry(f"{prefix}.down_proj.weight", stack, 1),
    }


def tensor_map(cfg: Config, architecture: str, experts: str = expert_layout.DEFAULT) -> dict:
    """Nested dict mirroring nnx.to_pure_dict(nnx.state(model)), with an Entry at every leaf.

    The N-gram tables' Entry names one HF table per branch (`_leaf_reader`, `_hf_tensors`); in a fused expert
    layout the experts' leaves are `expert_layout.FusedEntry`s.
    """
    L = "model.layers.{l}"
    layer = {
        "norm_in0": {"weight": Entry(f"{L}.input_layernorm.0.weight", "l")},
        "norm_in1": {"weight": Entry(f"{L}.input_layernorm.1.weight", "l")},
        "norm_post0": {"weight": Entry(f"{L}.post_attention_layernorm.0.weight", "l")},
        "norm_post1": {"weight": Entry(f"{L}.post_attention_layernorm.1.weight", "l")},
        "attn0": _mla(f"{L}.self_attn.0", "l"),
        "attn1": _mla(f"{L}.self_attn.1", "l"),
        "mlp0": _mlp(f"{L}.mlps.0", "l"),
        "mlp1": _mlp(f"{L}.mlps.1", "l"),
        "moe": {
            "classifier": Entry(f"{L}.mlp.router.classifier.weight", "l", 1),
            "bias": Entry(f"{L}.mlp.router.e_score_correction_bias", "l"),
            **expert_layout.entries(experts, _mlp),
        },
    }
    for i in range(cfg.indexer_sublayers):
        layer[f"indexer{i}"] = _indexer(f"{L}.self_attn.{i}.indexer", "l")
    tree = {
        "embed": Entry("model.embed_tokens.weight"),
        "layers": layer,
        "final_norm": {"weight": Entry("model.norm.weight")},
        "lm_head": Entry("lm_head.weight", "", 1),
    }
    if cfg.ngram_n:
        if architecture == LITE:
            table = "model.ngram_embeddings.embedders.{g}.weight"
            proj = "model.ngram_embeddings.post_projs.{g}.weight"
        elif architecture == LONGCAT2:
            table, proj = "model.oe_embed_tokens{g}.weight", "model.oe_embed_proj{g}.weight"
        else:
            raise ValueError(f"the {architecture} layout has no N-gram embedding")
        tree["ngram"] = {"tables": Entry(table, "g"), "proj": Entry(proj, "g", 1)}
    if cfg.mtp_num_steps:
        M = "model.mtp.layers.0"
        tree["mtp"] = {
            "embed": Entry("model.mtp.embed_tokens.weight"),
            "enorm": {"weight": Entry(f"{M}.enorm.m.weight")},
            "hnorm": {"weight": Entry(f"{M}.hnorm.m.weight")},
            "w_eh": Entry(f"{M}.eh_proj.weight", "", 1),
            "norm_in": {"weight": Entry(f"{M}.input_layernorm.weight")},
            "norm_post": {"weight": Entry(f"{M}.post_attention_layernorm.weight")},
            "attn": _mla(f"{M}.self_attn", ""),
            "mlp": _mlp(f"{M}.transformer_layer.mlp", ""),
            "final_norm": {"weight": Entry("model.mtp.norm.weight")},
        }
        if cfg.use_indexer:
            tree["mtp"]["indexer"] = _indexer(f"{M}.self_attn.indexer", "")
    return tree


def ignored(name: str) -> bool:
    """HF tensors that are present in real checkpoints but are not part of the model's math: the MTP block
    carries N-gram tensors it never uses."""
    return name.startswith(("model.mtp.oe_", "model.mtp.ngram_"))


# --- Reading -----------------------------------------------------------------------------------------------


class SafetensorsFolder:
    """Lazy, memory-mapped access to the tensors of a HF folder (one file or an index of shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor model.safetensors found")
            with safe_open(single, "numpy") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        fname = self.where[name]
        if fname not in self._files:
            path = os.path.join(self.path, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} (listed in {INDEX_FILE}) is missing")
            self._files[fname] = safe_open(path, "numpy")
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._file(name).get_slice(name)[start:stop]


def _flat(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _expected_hf_shapes(entry: Entry, shape, path, cfg: Config) -> dict[str, tuple]:
    """HF name -> expected HF shape for one of our leaves (fused experts: `expert_layout.expected_shapes`)."""
    if isinstance(entry, expert_layout.FusedEntry):
        return {}
    if path[-2:] == ("ngram", "tables"):
        return {entry.name.format(g=g): (rows, shape[1]) for g, rows in enumerate(cfg.ngram_table_rows)}
    n_stack = len(entry.stack)
    inner = shape[n_stack:]
    if entry.linear_in:
        inner = (int(np.prod(inner[entry.linear_in :])), int(np.prod(inner[: entry.linear_in])))
    return {name: tuple(inner) for name in entry.hf_names(shape)}


def check_tensors(folder: SafetensorsFolder, mapping: dict, shapes: dict, cfg: Config, experts: str):
    """Raise one error naming every missing, unexpected or mis-shaped tensor, before anything is allocated."""
    expected = expert_layout.expected_shapes(experts, cfg)
    for path, entry in mapping.items():
        expected.update(_expected_hf_shapes(entry, shapes[path], path, cfg))
    missing = sorted(set(expected) - set(folder.where))
    unexpected = sorted(n for n in set(folder.where) - set(expected) if not ignored(n))
    misshaped = [f"{n}: {folder.shape(n)} != expected {s}" for n, s in expected.items()
                 if n in folder.where and folder.shape(n) != s]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f" ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title} tensor(s): {shown}")
    if problems:
        raise ValueError(f"checkpoint {folder.path} does not match the model: " + "; ".join(problems))


def _leaf_reader(folder: SafetensorsFolder, entry: Entry, path, shape, dtype, cfg: Config) -> Callable:
    """Callback for make_array_from_callback: builds the requested slice of our leaf from HF tensors."""
    if path[-2:] == ("ngram", "tables"):
        offsets = table_offsets(cfg) + (sum(cfg.ngram_table_rows),)

        def read_rows(index):
            rows, cols = index[0], index[1]
            start, stop, _ = rows.indices(shape[0])
            parts = []
            for g in range(cfg.ngram_branches):
                lo, hi = max(start, offsets[g]), min(stop, offsets[g + 1])
                if lo < hi:
                    t = folder.get_rows(entry.name.format(g=g), lo - offsets[g], hi - offsets[g])
                    parts.append(t[:, cols])
            return np.concatenate(parts).astype(dtype)

        return read_rows

    n_stack = len(entry.stack)
    inner = shape[n_stack:]

    def read(index):
        stack_ranges = [range(*s.indices(n)) for s, n in zip(index[:n_stack], shape[:n_stack])]
        inner_index = index[n_stack:]
        out = np.empty([len(r) for r in stack_ranges] + [len(range(*s.indices(n)))
                                                         for s, n in zip(inner_index, inner)], dtype)
        for pos, idx in zip(itertools.product(*[range(len(r)) for r in stack_ranges]),
                            itertools.product(*stack_ranges)):
            name = entry.name.format(**dict(zip(entry.stack, idx)))
            out[pos] = entry.read(folder, name, inner, inner_index).astype(dtype)
        return out

    return read


def load_hf(path: str, mesh: jax.sharding.Mesh | None = None, *, rules=RULES,
            **overrides) -> tuple[Config, LongCat]:
    """Load a HF LongCat folder (Flash, Flash-Lite N-gram or LongCat-2.0 layout) -> (config, model).

    `overrides` replace Config fields (for example mla_norm_eps=1e-6 to match transformers exactly, or a
    compute dtype). With a mesh, every parameter is created directly on its shards, placed by `rules` (the
    logical -> mesh axis table, as for `build_model`). The experts may be stored in any
    `expert_layout.LAYOUTS`; the one found is logged (and returned by `hf_expert_layout`).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    arch = architecture_of(hf)
    cfg = config_from_hf(hf, **overrides)
    folder = SafetensorsFolder(path)
    experts = _detect_experts(folder, cfg)
    log.info("%s: experts stored %s (%s)", path, experts, expert_layout.LAYOUTS[experts])
    abstract = abstract_model(cfg, rules)
    graphdef, abs_state = nnx.split(abstract)
    pure = nnx.to_pure_dict(abs_state)
    shapes = {p: tuple(v.shape) for p, v in _flat(pure).items()}
    mapping = _flat(tensor_map(cfg, arch, experts))
    if set(mapping) != set(shapes):
        raise AssertionError(f"tensor_map out of date: {sorted(set(mapping) ^ set(shapes))}")
    check_tensors(folder, mapping, shapes, cfg, experts)

    if mesh is not None:  # an axis that does not divide what it shards is an error, not silent replication
        check_divisible(abs_state, mesh, rules)
    specs = _partition_specs(abs_state, rules) if mesh is not None else {}
    leaves = _flat(pure)
    values = {}
    for p, entry in mapping.items():
        leaf = leaves[p]
        if mesh is not None:
            sharding = jax.sharding.NamedSharding(mesh, specs[p])
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        reader = _leaf_reader(folder, entry, p, leaf.shape, np.dtype(leaf.dtype), cfg)
        values[p] = jax.make_array_from_callback(leaf.shape, sharding, reader)
    nested = _unflat(values)
    nnx.replace_by_pure_dict(abs_state, nested)
    return cfg, nnx.merge(graphdef, abs_state)


def _detect_experts(folder: SafetensorsFolder, cfg: Config) -> str:
    try:
        return expert_layout.detect(folder.where, folder.shape, cfg)
    except ValueError as e:
        raise ValueError(f"checkpoint {folder.path}: {e}") from None


def hf_expert_layout(path: str) -> str:
    """Which of `expert_layout.LAYOUTS` the HF folder at `path` stores its experts in."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    return _detect_experts(SafetensorsFolder(path), cfg)


def _unflat(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _partition_specs(abs_state, rules) -> dict:
    out = {}
    for path, var in nnx.to_flat_state(abs_state):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        out[tuple(path)] = logical_to_spec(tuple(names), rules)
    return out


# --- Writing -----------------------------------------------------------------------------------------------


def save_hf(model: LongCat, path: str, architecture: str | None = None, max_shard_bytes: int = 5 * 2**30,
            experts: str = expert_layout.DEFAULT):
    """Write `model` as a HF folder: config.json, sharded *.safetensors and the index.

    `experts` picks the experts' layout (`expert_layout.LAYOUTS`): the default is the one the installed
    transformers loads; "per_expert_with_zero" is the one transformers 5.24 needs.
    """
    cfg = model.cfg
    expert_layout.check(experts)
    hf = config_to_hf(cfg, architecture)
    arch = hf["architectures"][0]
    os.makedirs(path, exist_ok=True)
    state = _flat(nnx.to_pure_dict(nnx.state(model)))
    mapping = _flat(tensor_map(cfg, arch, experts))
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    size, files = 0, []

    def flush():
        nonlocal pending, size
        if pending:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(pending, os.path.join(path, fname + ".partial"), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in pending})
            pending, size = {}, 0

    tensors = itertools.chain.from_iterable(
        _hf_tensors(entry, p, state[p], cfg) for p, entry in mapping.items() if isinstance(entry, Entry))
    moe = [state[("layers", "moe", w)] for w in ("w_gate", "w_up", "w_down")]
    tensors = itertools.chain(tensors, expert_layout.hf_tensors(experts, cfg, *moe))
    for name, tensor in tensors:
        pending[name] = tensor
        size += tensor.nbytes
        if size >= max_shard_bytes:
            flush()
    flush()
    # Rename only once every shard is complete, so a crash never leaves a folder that looks whole.
    total = len(files)
    final = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(files)}
    for f, g in final.items():
        os.replace(os.path.join(path, f + ".partial"), os.path.join(path, g))
    total_size = sum(os.path.getsize(os.path.join(path, g)) for g in final.values())
    index = {"metadata": {"total_size": int(total_size)},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _hf_tensors(entry: Entry, path, leaf, cfg: Config):
    """Yield (HF name, numpy tensor) for one leaf, one stacked slice at a time."""
    if path[-2:] == ("ngram", "tables"):
        offsets = table_offsets(cfg)
        for g, rows in enumerate(cfg.ngram_table_rows):
            yield entry.name.format(g=g), np.asarray(leaf[offsets[g] : offsets[g] + rows])
        return
    n_stack = len(entry.stack)
    for idx in itertools.product(*[range(n) for n in leaf.shape[:n_stack]]):
        name = entry.name.format(**dict(zip(entry.stack, idx)))
        yield name, entry.to_hf(np.asarray(leaf[idx]))


__all__ = [
    "load_hf", "save_hf", "hf_expert_layout", "tensor_map", "SafetensorsFolder", "FLASH", "LITE", "LONGCAT2",
]
