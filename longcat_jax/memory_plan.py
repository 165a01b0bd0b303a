"""Per-device memory of a training or decode plan, from abstract shapes only (nothing is allocated, no device
is needed): `python -m longcat_jax.inspect --preset longcat_2 --mesh dp=8,cp=64,... --device-memory 80GiB`.

What is exact and what is estimated:
  params      exact: every parameter's shard shape under the rules table on a `jax.sharding.AbstractMesh` of
              the given sizes, in the parameter dtype (MTP block included: it is in memory).
  grads       exact (training): one gradient per parameter, same shard shape and dtype.
  optimizer   exact (training): `jax.eval_shape(make_optimizer(...).init, params)` with the real optimizer
              (Muon momentum for hidden matrices, AdamW's two moments for the rest, step counts), each leaf
              sharded like its parameter and then over `dp` by `zero1_state_shardings` (ZeRO-1), as
              `training/loop.py` places it (docs/architecture.md#optimizer).
  kv_cache    exact (decode): `init_cache(cfg, batch, context)` shapes (latent c_kv and k_rope in the compute
              dtype, indexer keys in f32, docs/architecture.md#cache), sharded by logical names
              (layers, -, batch, seq, -): layers over `pp`, sequences over `dp`, the context over `cp` under
              the default rules. The paged pool of the serving engine holds the same bytes per token.
  activations an estimate, see `activation_bytes` for the formula and its assumptions.
  logits      an estimate of the f32 logits the loss keeps (see `activation_bytes`).

The total leaves out XLA's scratch buffers, fragmentation and the compiled program, so keep a margin.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from longcat_jax.config import Config
from longcat_jax.model.cache import init_cache
from longcat_jax.model.longcat import abstract_model
from longcat_jax.training.optim import OptimizerSettings, make_optimizer, zero1_state_shardings
from sharding.divisibility import axes_of, resolve_shardings, shard_shape
from sharding.mesh import abstract_mesh, describe
from sharding.rules import RULES

MODES = ("train", "decode")
REMAT = ("none", "full")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'64GiB' -> 68719476736; accepts B, KB/MB/GB/TB (powers of 10) and KiB/MiB/GiB/TiB (powers of 2)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"bad memory size {text!r}: a number and B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"bad memory size {text!r}: must be more than 0 bytes")
    return n


def format_bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """What runs on the mesh: a training step over batch x seq_len tokens, or decode of batch sequences
    with context tokens cached each."""

    mode: str = "train"
    batch: int = 1  # global sequences
    seq_len: int = 4096  # tokens per training sequence
    context: int = 4096  # decode: cached tokens per sequence
    dtype: str = "bfloat16"  # compute: activations and the KV latent
    param_dtype: str = "float32"  # parameters, gradients and optimizer state (train.py's default)
    remat: str = "none"  # none: keep every layer's activations; full: keep only each layer's input
    optimizer: str = "muon"  # muon | adamw (train.py --optimizer)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"memory plan: {msg}")

        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.remat in REMAT, f"remat must be one of {REMAT}, got {self.remat!r}")
        need(self.optimizer in ("muon", "adamw"), f"optimizer must be muon or adamw, got {self.optimizer!r}")
        for name in ("batch", "seq_len", "context"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                need(False, f"unknown {name} {getattr(self, name)!r}")


def _bytes(leaves, dtypes, mesh) -> int:
    return sum(math.prod(shard_shape(leaf, mesh)) * jnp.dtype(dt).itemsize
               for leaf, dt in zip(leaves, dtypes))


def _group(path: str) -> str:
    """Parameter group for the report: 'layers.attn0.w_o' -> 'layers.attn', 'ngram.proj' stays."""
    parts = path.split(".")
    if parts[0] == "layers":
        return "layers." + parts[1].rstrip("0123456789")
    return ".".join(parts[:2]) if parts[0] == "ngram" else parts[0]


def param_plan(cfg: Config, mesh, rules=RULES) -> tuple[int, dict[str, int], nnx.State, list]:
    """(bytes per device, bytes per group, the abstract parameter state, its checked placements)."""
    state = nnx.state(abstract_model(cfg, rules))
    leaves = resolve_shardings(state, mesh, rules)
    dtypes = [var.get_value().dtype for _, var in nnx.to_flat_state(state)]
    groups: dict[str, int] = {}
    for leaf, dt in zip(leaves, dtypes):
        groups[_group(leaf.path)] = groups.get(_group(leaf.path), 0) + _bytes([leaf], [dt], mesh)
    return sum(groups.values()), groups, state, leaves


def optimizer_bytes(state: nnx.State, leaves, mesh, settings: PlanSettings) -> int:
    """Per-device bytes of the real optimizer's state, sharded like the parameters, then over dp (ZeRO-1)."""
    # Explicit axes make eval_shape carry each parameter's sharding into the state leaves built from it.
    explicit = jax.sharding.AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.axis_names),
                                         axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
    specs = iter(leaves)

    def placed(var):
        value = var.get_value()
        sharding = NamedSharding(explicit, jax.sharding.PartitionSpec(*next(specs).spec))
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    params = jax.tree.map(placed, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    optimizer = make_optimizer(OptimizerSettings(use_muon=settings.optimizer == "muon"), params)
    opt_state = jax.eval_shape(optimizer.init, params)
    shardings = zero1_state_shardings(opt_state, explicit)
    placed_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                opt_state, shardings)
    return _bytes(resolve_shardings(placed_state, explicit), [x.dtype for x in jax.tree.leaves(opt_state)],
                  explicit)


def kv_cache_bytes(cfg: Config, mesh, settings: PlanSettings, rules=RULES) -> int:
    """Per-device bytes of the decode cache for batch sequences of context tokens (see module doc)."""
    cache = jax.eval_shape(lambda: init_cache(cfg, settings.batch, settings.context))
    rows = ("layers", None, "batch", "seq", None)  # [L, per layer, B, S, width]
    named = {"cache.c_kv": (cache.c_kv.shape, rows), "cache.k_rope": (cache.k_rope.shape, rows)}
    dtypes = [cache.c_kv.dtype, cache.k_rope.dtype]
    if cache.index_k is not None:
        named["cache.index_k"] = (cache.index_k.shape, rows)
        dtypes.append(cache.index_k.dtype)
    if cache.ngram_history is not None:
        named["cache.ngram_history"] = (cache.ngram_history.shape, ("batch", None))
        dtypes.append(cache.ngram_history.dtype)
    return _bytes(resolve_shardings(named, mesh, rules), dtypes, mesh)


def _split(name: str, mesh, rules) -> int:
    """How many ways the rules split a logical axis on this mesh."""
    return math.prod(mesh.shape[a] for a in axes_of(dict(rules).get(name)) if a in mesh.shape)


def activation_bytes(cfg: Config, mesh, settings: PlanSettings, rules=RULES) -> dict[str, int]:
    """Estimated per-device bytes of what a step keeps: {"activations": ..., "logits": ...}.

    Tokens per device t = (batch / ways(batch)) x (seq_len / ways(seq)); widths split by their rules over the
    mesh axes that do not already split the tokens (one array uses a mesh axis once): N/n_h for heads, F/n_f
    for mlp, Fe/n_e for expert_mlp, V/n_v for vocab, I/n_i for indexer heads; b is the compute dtype's size.
    Values kept per token for one decoder layer, from the code's forward:

      attention (x2)   b (2D + 2Rq + 2R + 2Hr + [N(Hn+Hr) + N Hr + N(Hn+Hv) + N Hv] / n_h) + 4 N/n_h
                       (norm in/out, query latent raw/normed, KV latent raw/normed, k_rope, q, roped q,
                       k_nope|v, output; f32 softmax statistics)
      indexer owner    b (I J / n_i + 2J) + 4 (I/n_i + K)    (queries, keys, f32 head weights, top-K ids)
      SwiGLU (x2)      b (D + 3F/n_f)                         (normed input, gate, up, gate*up)
      MoE              4 (2 (E+Z)) + 8 k + b r (2D + 3Fe/n_e)
                       (f32 router logits and probs, top-k weights and ids; r dispatch rows per token: k on
                       the dropless path, which broadcasts every token to all k slots, cf k / ways(experts)
                       on the capacity path)
      residual sums    b 3D

    Training keeps L such layers with remat none, or L x b D (each layer's input) plus one layer being
    recomputed with remat full. On top: the embedding (b (2D + G dn)), the MTP block (S steps of one
    attention + indexer + SwiGLU + b 3D, not rematerialised) and, with sequence sharding, the all-gathered
    keys of one sublayer (b (batch/ways(batch)) seq_len (R + Hr + J)). Attention itself is assumed
    memory-bounded (kernel_impl auto/xla/pallas): the `reference` path materialises [T, S] scores and needs
    far more. Logits: the fused LM head keeps f32 [t, V/n_v] and its backward adds f32 probabilities and a
    gradient in b; each MTP step keeps its f32 logits and log-softmax (8 bytes per logit).

    Decode (one token per sequence, nothing kept across layers): one layer's values for batch/ways(batch)
    tokens, the f32 logits, and one sublayer's attention scores over the cached context (the indexer's
    per-head f32 scores and the K gathered latent rows with an indexer, f32 scores per head without one).
    """
    b = jnp.dtype(settings.dtype).itemsize
    D, L, N = cfg.hidden_size, cfg.num_layers, cfg.num_heads
    Rq, R, Hr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Hn, Hv = cfg.qk_nope_head_dim, cfg.v_head_dim
    I, J, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk

    table = dict(rules)
    token_axes = set(axes_of(table.get("batch"))) | set(axes_of(table.get("seq")))

    def ways(name):
        return _split(name, mesh, rules)

    def width_ways(name):  # a mesh axis already splitting the tokens cannot split a width of the same array
        axes = [a for a in axes_of(table.get(name)) if a in mesh.shape and a not in token_axes]
        return math.prod(mesh.shape[a] for a in axes)

    widths = ("heads", "mlp", "expert_mlp", "vocab", "indexer_heads")
    n_h, n_f, n_e, n_v, n_i = (width_ways(n) for n in widths)
    per_batch = settings.batch // ways("batch")
    t = per_batch * (settings.seq_len // ways("seq") if settings.mode == "train" else 1)

    attn = b * (2 * D + 2 * Rq + 2 * R + 2 * Hr + (N * (Hn + Hr) + N * Hr + N * (Hn + Hv) + N * Hv) / n_h)
    attn += 4 * N / n_h
    owners = cfg.indexer_sublayers if cfg.use_indexer else 0
    indexer = b * (I * J / n_i + 2 * J) + 4 * (I / n_i + K)
    mlp = b * (D + 3 * cfg.ffn_hidden_size / n_f)
    k = cfg.moe_topk
    rows = k if cfg.capacity_factor is None else cfg.capacity_factor * k / ways("experts")
    moe = 4 * 2 * cfg.num_slots + 8 * k + b * rows * (2 * D + 3 * cfg.expert_ffn_hidden_size / n_e)
    layer = 2 * attn + owners * indexer + 2 * mlp + moe + b * 3 * D  # bytes per token

    if settings.mode == "decode":
        S = settings.context // ways("seq")
        if cfg.use_indexer:
            scores = per_batch * (4 * S * I / n_i + b * K * (R + Hr))
        else:
            scores = per_batch * 4 * S * N / n_h
        return {"activations": int(t * layer + scores), "logits": int(t * 4 * cfg.vocab_size / n_v)}

    kept = L * t * layer if settings.remat == "none" else L * t * b * D + t * layer
    embedding = t * b * (2 * D + cfg.ngram_branches * cfg.ngram_dim if cfg.ngram_n else D)
    steps = cfg.mtp_num_steps
    mtp = steps * t * (attn + (indexer if cfg.use_indexer else 0) + mlp + b * 3 * D)
    gathered = 0
    if ways("seq") > 1:
        gathered = per_batch * settings.seq_len * b * (R + Hr + (J if cfg.use_indexer else 0))
    logits = t * cfg.vocab_size / n_v * ((8 + b) + 8 * steps)
    return {"activations": int(kept + embedding + mtp + gathered), "logits": int(logits)}


def plan_memory(cfg: Config, sizes: dict[str, int], settings: PlanSettings, rules=RULES,
                device_memory: int | None = None, device_count: int | None = None) -> dict:
    """The per-device memory of `settings` on a mesh of `sizes` (an 'auto' axis needs device_count), with a
    fits / does-not-fit verdict when device_memory (bytes) is given. Raises ValueError naming the array, the
    dimension, the logical name and the mesh axis when an axis does not divide what it shards."""
    mesh = abstract_mesh(sizes, device_count)
    cfg = cfg.replace(dtype=settings.dtype, param_dtype=settings.param_dtype)
    tokens = (settings.batch, settings.seq_len if settings.mode == "train" else 1)
    token_names = ("batch", "seq" if settings.mode == "train" else None)
    resolve_shardings({"tokens": (tokens, token_names)}, mesh, rules)
    params, groups, state, leaves = param_plan(cfg, mesh, rules)
    parts = {"params": params}
    if settings.mode == "train":
        parts["grads"] = params
        parts["optimizer"] = optimizer_bytes(state, leaves, mesh, settings)
    else:
        parts["kv_cache"] = kv_cache_bytes(cfg, mesh, settings, rules)
    parts.update(activation_bytes(cfg, mesh, settings, rules))
    total = sum(parts.values())
    per_device_tokens = math.prod(n // _split(name, mesh, rules) if name else n
                                  for n, name in zip(tokens, token_names))
    plan = {
        "mesh": describe({a: n for a, n in mesh.shape.items() if n > 1}),
        "devices": mesh.size,
        **dataclasses.asdict(settings),
        "tokens_per_device": per_device_tokens,
        "per_device_bytes": {**parts, "total": total},
        "params_by_group": groups,
    }
    if settings.mode == "train":
        plan.pop("context")
    else:
        plan.pop("seq_len")
        plan.pop("remat")
        plan.pop("optimizer")
    if device_memory is not None:
        plan.update(device_memory=device_memory, fits=total <= device_memory,
                    margin_bytes=device_memory - total)
    return plan


def batch_ways(sizes: dict[str, int], rules=RULES, device_count: int | None = None) -> int:
    """How many ways the batch is split on this mesh (the smallest global batch a plan can have)."""
    return _split("batch", abstract_mesh(sizes, device_count), rules)
