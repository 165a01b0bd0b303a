"""The LongCat model: embeddings, the scanned stack of ScMoE layers, the LM head and MTP
(docs/architecture.md#model).

Three explicit modes share the same blocks:
  forward(model, tokens)              training / full sequence; main logits, MTP draft logits, hidden states
  prefill(model, tokens, max_len)     fills a fresh Cache and returns the logits
  decode_step(model, tokens, cache)   appends tokens (usually one) to the cache, attending in absorbed form
  paged_step(model, tokens, ...)      the serving engine's step: per-sequence lengths over a paged cache
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model import context_parallel, paged_cache, pipeline
from longcat_jax.model.block import Context, DecoderLayer
from longcat_jax.model.cache import Cache, init_cache
from longcat_jax.model.layers import RMSNorm, config_inv_freq, param
from longcat_jax.model.mla import add_absorbed_weights
from longcat_jax.model.mtp import MTP
from longcat_jax.model.ngram import NgramEmbedding, next_history
from longcat_jax.model.paged_cache import PagedCache
from pallas_kernels.cpu_serving import matmul, small_rows
from pallas_kernels.ngram_lookup import ngram_lookup
from sharding.constrain import constrain
from sharding.divisibility import check_divisible
from sharding.rules import RULES


class LongCat(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, rules=RULES):
        pd, D, V = cfg.jnp_param_dtype, cfg.hidden_size, cfg.vocab_size
        self.embed = param(rngs, (V, D), ("vocab", "embed"), pd)
        self.ngram = NgramEmbedding(cfg, rngs) if cfg.ngram_n else None
        self.layers = _stacked_layers(cfg, rngs)
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, cfg)
        self.lm_head = param(rngs, (D, V), ("embed", "vocab"), pd)
        self.mtp = MTP(cfg, rngs) if cfg.mtp_num_steps else None
        self.cfg = cfg
        # The logical -> mesh axis table the parameters were created under; activations follow it too.
        self.rules = rules

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Main-head logits [B, T, V] for int token ids [B, T]."""
        return forward(self, input_ids).logits


def _stacked_layers(cfg: Config, rngs: nnx.Rngs) -> DecoderLayer:
    """num_layers DecoderLayers with every parameter stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return DecoderLayer(cfg, r)

    return make(rngs)


@dataclasses.dataclass(frozen=True)
class Output:
    logits: jax.Array  # [B, T, V] f32
    mtp_logits: jax.Array | None  # [S, B, T, V] f32, S = mtp_num_steps
    hidden: jax.Array  # [B, T, D] final hidden state before the final norm
    # With collect_aux: indexer_kl (sum over layers), expert_load [L, slots], balance_loss (mean over layers),
    # mtp_indexer_kl; in the dense warm-up or with measure_recall also indexer_recall (mean over layers) and
    # mtp_indexer_recall. Empty otherwise.
    aux: dict = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(Output, data_fields=["logits", "mtp_logits", "hidden", "aux"],
                                 meta_fields=[])


def embed_tokens(model: LongCat, tokens, history=None):
    """Token embedding, averaged with the N-gram branches when present:
    (E[x] + sum_i P_i T_i[id_i]) / (1 + G)."""
    cfg = model.cfg
    e = model.embed[...].astype(cfg.jnp_dtype)[tokens]
    if model.ngram is not None:
        if cfg.kernel_impl == "reference":
            ngram = model.ngram(tokens, history)
        else:  # hash + gather + project + sum in one pass; row-sharded tables stay on their vp shards
            ngram = ngram_lookup(model.ngram.tables[...], model.ngram.proj[...], tokens, cfg, history,
                                 impl=cfg.kernel_impl, rules=model.rules)
        e = (e + ngram) / jnp.asarray(1 + cfg.ngram_branches, e.dtype)
    return e


def unstack_layers(model: LongCat) -> list:
    """Each layer's parameters as its own arrays (a copy), and each expert's weights within it as a tuple of
    per-expert arrays: `restack_experts` turns one layer back into what `paged_step(..., layers=...)` runs.

    XLA:CPU copies a dynamic slice that feeds a matmul: a layer's weights out of the stacked [L, ...] arrays
    in every iteration of the layer scan, an expert's out of [E, ...] in every tile of the expert loop. Both
    cost about as much as the matmuls of a decode step. Separate arrays are read in place (the expert loop
    slices the restacked experts at constant indices, which XLA folds back to the arrays)."""
    _, state = nnx.split(model.layers)

    def layer(i):
        def take(path, x):
            if _is_expert_weight(path):
                return tuple(jnp.array(x[i, e]) for e in range(x.shape[1]))
            return jnp.array(x[i])

        return jax.tree_util.tree_map_with_path(take, state)

    return [layer(i) for i in range(model.cfg.num_layers)]


def restack_experts(layer_state):
    """One layer of `unstack_layers` with its per-expert tuples stacked back into [E, ...] arrays."""
    return jax.tree.map(lambda x: jnp.stack(x) if isinstance(x, tuple) else x, layer_state,
                        is_leaf=lambda x: isinstance(x, tuple))


def _is_expert_weight(path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return "moe" in keys and any(k in ("w_gate", "w_up", "w_down") for k in keys)


def _run_layers(model: LongCat, h, ctx: Context, layer_caches: dict | None, remat=None,
                paged: bool = False, layers: list | None = None, microbatches: int = 1):
    """Scan the stacked layers; returns (h, new per-layer cache dict or None, per-layer aux stacked on [L]).

    Without a cache, under a mesh whose stage axis (the one the rules give `layers`) has several devices,
    the layers run as a pipeline of `microbatches` microbatches over it instead (`pipeline.run`, the same
    results).

    layer_caches: None, or the cache arrays stacked on a leading [L] axis by name (Cache's c_kv, k_rope and
    index_k, or PagedCache's kv, index_k and, with HI, index_sum). remat: None (keep every activation) or a
    jax.checkpoint policy applied to each layer. paged: layer_caches is the whole PagedCache (kv, index_k,
    index_sum), which the layers only read; the result holds every layer's new rows instead of a new cache
    (see `paged_step`). layers (paged only): `unstack_layers(model)`, run in a Python loop instead of the
    scan.
    """
    graphdef, state = nnx.split(model.layers)
    if layer_caches is None and (axis := pipeline.stage_axis(model.rules)) is not None:
        def layer_fn(layer_state, h, ctx):
            layer = nnx.merge(graphdef, layer_state)
            h, _, aux = layer(constrain(h, ("batch", "seq", "embed"), model.rules), ctx)
            return h, aux

        h, aux = pipeline.run(layer_fn, state, h, ctx, axis, microbatches, model.rules, remat)
        return h, None, aux
    if microbatches != 1:
        raise ValueError(f"{microbatches} microbatches: they split the batch for the pipeline, which needs a "
                         "mesh whose axis for `layers` has more than one device")
    if paged and layers is not None:
        all_rows, all_aux = [], []
        for index, layer_state in enumerate(layers):
            layer = nnx.merge(graphdef, layer_state)
            h, rows, aux = layer(constrain(h, ("batch", "seq", "embed"), model.rules), ctx,
                                 {**layer_caches, "layer": index})
            all_rows.append(rows)
            all_aux.append(aux)
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        return h, jax.tree.map(stack, *all_rows), jax.tree.map(stack, *all_aux)
    if paged:
        def paged_body(h, xs):
            layer_state, index = xs
            layer = nnx.merge(graphdef, layer_state)
            h, rows, aux = layer(constrain(h, ("batch", "seq", "embed"), model.rules), ctx,
                                 {**layer_caches, "layer": index})
            return h, (rows, aux)

        layers = jnp.arange(model.cfg.num_layers, dtype=jnp.int32)
        h, (rows, aux) = jax.lax.scan(paged_body, h, (state, layers))
        return h, rows, aux

    def body(h, xs):
        layer_state, layer_cache = xs
        layer = nnx.merge(graphdef, layer_state)
        h, new_cache, aux = layer(constrain(h, ("batch", "seq", "embed"), model.rules), ctx, layer_cache)
        return h, (new_cache, aux)

    if remat is not None:
        body = jax.checkpoint(body, policy=remat, prevent_cse=False)
    h, (caches, aux) = jax.lax.scan(body, h, (state, layer_caches))
    return h, caches, aux


def _logits(model: LongCat, h):
    return matmul(model.final_norm(h), model.lm_head[...]).astype(jnp.float32)


def forward(model: LongCat, tokens: jax.Array, positions: jax.Array | None = None, with_mtp: bool = True, *,
            segment_ids: jax.Array | None = None, collect_aux: bool = False, dense_attention: bool = False,
            measure_recall: bool = False, remat=None, microbatches: int = 1) -> Output:
    """Full-sequence forward.

    tokens int [B, T]; positions default to 0..T-1. segment_ids [B, T] marks packed documents (0 = padding),
    with positions restarting at 0 in each: attention and selection then stay inside a document, and padding
    is no query's key. HI block means pool whole rows but the padding (HI is training-free and off below
    hi_min_len). collect_aux returns the training
    statistics in Output.aux; dense_attention is the indexer warm-up stage (attention ignores the selection);
    measure_recall also measures the sparse stage's selection recall against the dense attention
    (block.Context); remat is a jax.checkpoint policy for each layer. microbatches splits the batch's rows
    for the pipeline over the stacked layers' mesh axis (`pipeline.run`; it needs that axis on the mesh).
    """
    cfg = model.cfg
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = Context(positions=positions, inv_freq=config_inv_freq(cfg), rules=model.rules,
                  segment_ids=segment_ids, collect_aux=collect_aux, dense_attention=dense_attention,
                  measure_recall=measure_recall)
    h = embed_tokens(model, tokens)
    # Context parallelism (docs/architecture.md#context-parallel): the layers run in the balanced layout, the
    # head, the losses and MTP in natural order (MTP's attention still gathers its keys over the shards).
    layout = context_parallel.balanced_layout(T, model.rules)
    if layout is not None:
        natural = dataclasses.replace(ctx, cp=layout.natural())
        h, ctx = layout.from_natural(h), natural.laid_out(layout)
    h, _, layer_aux = _run_layers(model, h, ctx, None, remat, microbatches=microbatches)
    if layout is not None:
        h, ctx = layout.to_natural(h), natural
    logits = _logits(model, h)
    mtp_logits, aux = None, {}
    if collect_aux:
        aux = {"expert_load": layer_aux["expert_load"], "balance_loss": layer_aux["balance_loss"].mean()}
        if cfg.use_indexer:
            aux["indexer_kl"] = layer_aux["indexer_kl"].sum()
            if "indexer_recall" in layer_aux:  # dense warm-up, or measured (see block.indexer_aux)
                aux["indexer_recall"] = layer_aux["indexer_recall"].mean()
    if with_mtp and model.mtp is not None:
        h0 = h if cfg.mtp_hidden_source == "pre_norm" else model.final_norm(h)
        mtp_logits, mtp_aux = model.mtp(h0, tokens, ctx, model.lm_head[...])
        mtp_logits = mtp_logits.astype(jnp.float32)
        aux.update({f"mtp_{k}": v for k, v in mtp_aux.items()})
    return Output(logits=logits, mtp_logits=mtp_logits, hidden=h, aux=aux)


def decode_step(model: LongCat, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Append tokens [B, T] (T >= 1) at cache.length; returns (logits [B, T, V], updated cache)."""
    cfg = model.cfg
    B, T = tokens.shape
    positions = cache.length + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = Context(positions=positions, inv_freq=config_inv_freq(cfg), rules=model.rules,
                  cache_len=cache.length)
    h = embed_tokens(model, tokens, cache.ngram_history)
    layer_caches = {"c_kv": cache.c_kv, "k_rope": cache.k_rope}
    if cache.index_k is not None:
        layer_caches["index_k"] = cache.index_k
    h, new, _ = _run_layers(model, h, ctx, layer_caches)
    history = None if cache.ngram_history is None else next_history(cache.ngram_history, tokens, cfg)
    cache = Cache(c_kv=new["c_kv"], k_rope=new["k_rope"], index_k=new.get("index_k"), ngram_history=history,
                  length=cache.length + T)
    return _logits(model, h), cache


def paged_step(model: LongCat, tokens: jax.Array, starts: jax.Array, new_lens: jax.Array,
               page_table: jax.Array, cache: PagedCache, history: jax.Array | None = None,
               layers: list | None = None) -> tuple[jax.Array, PagedCache]:
    """One step of the serving engine over the paged cache: row b appends tokens[b, :new_lens[b]] to its
    sequence at positions starts[b].. (a prefill chunk, or one decode token); the rest of the row pads it to a
    compiled shape. history [B, N-1] holds the N-1 tokens before each row's first (N-gram embedding; zeros
    before the sequence start). layers: `unstack_layers(model)` to run the layers from separate arrays (the
    faster form on CPU), or None for the scan over the stacked ones. Returns (logits [B, V] f32 at each row's
    last real token, the cache); rows with new_lens 0 are inert (their logits are meaningless).
    """
    cfg = model.cfg
    B, T = tokens.shape
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    real = jnp.arange(T)[None, :] < new_lens[:, None]
    # segment_ids = real keeps the padding out of the MoE (routed to the zero experts with weight 0)
    ctx = Context(positions=positions, inv_freq=config_inv_freq(cfg), rules=model.rules, cache_len=starts,
                  page_table=page_table, new_lens=new_lens, segment_ids=real.astype(jnp.int32))
    h = embed_tokens(model, tokens, history)
    layer_caches = {"kv": cache.kv}
    if cache.index_k is not None:
        layer_caches["index_k"] = cache.index_k
    if cache.index_sum is not None:
        layer_caches["index_sum"] = cache.index_sum
    h, rows, _ = _run_layers(model, h, ctx, layer_caches, paged=True, layers=layers)
    # The layers read the pages; every layer's new rows are written once, after them, in place.
    slots = paged_cache.row_slots(page_table, positions, new_lens, cache.num_pages, cache.page_size)
    if layers is not None:
        # Unrolled, the last sublayer's page reads feed only h, so XLA could schedule the write before them,
        # and copies the whole pool to keep them correct. A dependency on h that never changes a slot orders
        # the write after every read (x != x and x == x is false for any x, NaN too; XLA does not fold it).
        x = h[0, 0, 0]
        slots = jnp.where((x != x) & (x == x), cache.num_pages * cache.page_size, slots)
    index_k = index_sum = None
    if cache.index_k is not None:
        index_k = paged_cache.write_rows(cache.index_k, rows["index_k"], slots)
    if cache.index_sum is not None:  # each page that took a row gets its sums anew from its rows
        pages = paged_cache.written_pages(slots, positions, cache.page_size, cache.num_pages)
        index_sum = paged_cache.write_index_sums(cache.index_sum, index_k, pages)
    cache = PagedCache(kv=paged_cache.write_rows(cache.kv, rows["kv"], slots), index_k=index_k,
                       index_sum=index_sum)
    last = jnp.take_along_axis(h, jnp.maximum(new_lens - 1, 0)[:, None, None], axis=1)  # [B, 1, D]
    return _logits(model, last)[:, 0], cache


def serving_form(model: LongCat) -> LongCat:
    """A copy of the model (sharing its arrays) whose attention holds W_UK and W_UV split out of w_kv_up
    (`mla.add_absorbed_weights`), so that a decode step reads them in place instead of copying them."""
    model = nnx.clone(model)
    add_absorbed_weights(model.layers.attn0)
    add_absorbed_weights(model.layers.attn1)
    return model


def jit_paged_step(model: LongCat, unroll: bool | None = None):
    """(the jitted serving step, the parameters it takes first): step(params, tokens, starts, new_lens,
    page_table, cache, history) is `paged_step` with the cache donated.

    unroll (None: on CPU only) holds the layers' parameters as separate per-layer (and per-expert) arrays
    (`unstack_layers`) and runs them unrolled: XLA:CPU copies each layer's weights out of the stacked arrays
    in every step of the scan, and each expert's out of the stacked experts in every tile. The stacked model
    is rebuilt inside the step for its structure only (XLA drops the stack). On CPU the step runs its own
    kernels where they apply (`pallas_kernels.cpu_serving`, `small_rows`).
    """
    on_cpu = jax.default_backend() == "cpu"
    if unroll is None:
        unroll = on_cpu
    model = serving_form(model)
    if not unroll:
        graphdef, params = nnx.split(model)

        def step(state, tokens, starts, new_lens, table, cache, history):
            with small_rows(on_cpu):
                return paged_step(nnx.merge(graphdef, state), tokens, starts, new_lens, table, cache, history)
    else:
        graphdef, _, rest = nnx.split(model, nnx.PathContains("layers"), ...)
        params = (rest, unstack_layers(model))

        def step(params, tokens, starts, new_lens, table, cache, history):
            rest, layers = params
            layers = [restack_experts(layer) for layer in layers]
            stacked = nnx.State({"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)})
            with small_rows(on_cpu):
                return paged_step(nnx.merge(graphdef, stacked, rest), tokens, starts, new_lens, table, cache,
                                  history, layers=layers)

    # The parameters travel as a flat list of arrays: flattening the nnx state (507 arrays at the `small`
    # preset) on every call cost the host 0.5-1 ms, up to a tenth of a batch-1 decode step on CPU.
    leaves, treedef = jax.tree.flatten(params)

    def flat_step(leaves, *args):
        return step(jax.tree.unflatten(treedef, leaves), *args)

    return jax.jit(flat_step, donate_argnums=5), leaves


def prefill(model: LongCat, tokens: jax.Array, max_len: int) -> tuple[jax.Array, Cache]:
    """Run a prompt [B, T] into a fresh cache of max_len rows; returns (logits [B, T, V], cache)."""
    B, T = tokens.shape
    if T > max_len:
        raise ValueError(f"prompt of {T} tokens does not fit a cache of {max_len}")
    return decode_step(model, tokens, init_cache(model.cfg, B, max_len))


def build_model(cfg: Config, seed: int = 0, mesh: jax.sharding.Mesh | None = None, rules=RULES) -> LongCat:
    """Initialise a model. With a mesh, parameters are born sharded inside jit
    (docs/architecture.md#sharded-init); without one, on the default device with the logical names
    kept as metadata."""
    if mesh is None:
        with nnx.use_eager_sharding(False):
            return LongCat(cfg, nnx.Rngs(seed), rules)
    # An axis that does not divide what it shards would leave the array silently replicated: refuse it first.
    check_divisible(abstract_model(cfg, rules), mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return jax.jit(lambda: _placed(LongCat(cfg, nnx.Rngs(seed), rules), rules))()


def _placed(model: LongCat, rules) -> LongCat:
    """Every parameter constrained to its logical names: nnx.vmap applies the per-layer constraints inside
    and leaves the stacked `layers` axis replicated, so without this every pp device would store every
    layer."""
    graphdef, state = nnx.split(model)
    for _, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        if names:
            var.set_value(constrain(var.get_value(), tuple(names), rules))
    return nnx.merge(graphdef, state)


def abstract_model(cfg: Config, rules=RULES) -> LongCat:
    """The model with ShapeDtypeStruct leaves: nothing allocated (parameter counts, checkpoint restore)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: LongCat(cfg, nnx.Rngs(0), rules))

