"""Model FLOPs of a training step and model-FLOPs utilisation (MFU) against the device's measured matmul rate.

The count follows the usual MFU convention (PaLM, appendix B): the matmul FLOPs the model needs, not what the
compiled program happens to do (recomputation, padding and dispatch do not count). A token costs 6 FLOPs
per matmul weight it touches (forward 2, backward 4) and 6 per attention score and value it computes.
"""

from __future__ import annotations

import jax

from longcat_jax.config import Config

# Parameters that are looked up, not multiplied: the token embeddings (main and MTP) and the N-gram tables.
LOOKUPS = ("['embed']", "['mtp']['embed']", "['ngram']['tables']")


def active_matmul_params(cfg: Config, params) -> float:
    """Matmul weights one token touches in a training step: every weight matrix of the stack, the routed
    experts scaled by the real experts a token picks (cfg.expected_real_experts, else the uniform share of
    top-k over experts and zero experts), the MTP module and the LM head once per draft depth."""
    real = cfg.expected_real_experts or cfg.moe_topk * cfg.n_routed_experts / cfg.num_slots
    total = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path).replace(".value", "")
        stacked = name.startswith("['layers']")
        if x.ndim < 2 + stacked or name in LOOKUPS or name.endswith("['bias']"):
            continue  # norms and the router bias are elementwise
        n = float(x.size)
        if stacked and "['moe']['w_" in name:
            n *= real / cfg.n_routed_experts
        if name.startswith("['mtp']"):
            n *= cfg.mtp_num_steps
        if name == "['lm_head']":
            n *= 1 + cfg.mtp_num_steps
        total += n
    return total


def step_flops(cfg: Config, params, batch: int, seq: int, *, sparse: bool) -> float:
    """Model FLOPs of one training step of `batch` rows of `seq` tokens. Each attention sublayer scores every
    key in the dense stage and index_topk keys in the sparse one (the indexers score every key)."""
    tokens = batch * seq
    keys = min(seq, cfg.index_topk) if (sparse and cfg.use_indexer) else seq
    sublayers = cfg.num_sublayers + cfg.mtp_num_steps
    attention = sublayers * cfg.num_heads * keys * (cfg.qk_head_dim + cfg.v_head_dim)
    indexers = (cfg.num_layers * cfg.indexer_sublayers + cfg.mtp_num_steps) if cfg.use_indexer else 0
    scoring = indexers * cfg.index_n_heads * seq * cfg.index_head_dim
    return 6.0 * tokens * (active_matmul_params(cfg, params) + attention + scoring)
