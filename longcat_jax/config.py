"""The one model configuration: a frozen, hashable dataclass with the published presets.

Field names follow the Hugging Face `config.json` of the LongCat family where one exists
(docs/architecture.md#presets); `hf/config.py` maps the remaining spellings (Flash-Lite `ngram_*`/`emb_*`,
LongCat-2.0 `oe_*`). Run settings (mesh, optimizer, data) are not model config and live with the scripts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    # --- Dimensions ---------------------------------------------------------------------------------
    vocab_size: int = 163840
    hidden_size: int = 8192
    num_layers: int = 38  # logical ScMoE layers; each holds two MLA sublayers
    ffn_hidden_size: int = 12288  # dense SwiGLU `mlps`
    rms_norm_eps: float = 1e-5

    # --- MLA (docs/architecture.md#mla) -----------------------------------------------------------------
    num_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_scale_q_lora: bool = True  # multiply q by sqrt(hidden / q_lora_rank)
    mla_scale_kv_lora: bool = True  # multiply c_kv by sqrt(hidden / kv_lora_rank)
    # HF uses its RMSNorm class default 1e-6 for q_a/kv_a norms; SGLang and mlx-lm use rms_norm_eps
    # (docs/architecture.md#rmsnorm).
    mla_norm_eps: float = 1e-5

    # --- RoPE / DeepSeek-YaRN (docs/architecture.md#rope) ---------------------------------------------
    rope_theta: float = 1e6
    rope_factor: float = 120.0  # 1.0 = plain RoPE
    rope_original_max_position: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    max_position_embeddings: int = 262144

    # --- MoE with zero-computation experts (docs/architecture.md#router) -------------------------------
    n_routed_experts: int = 768
    zero_expert_num: int = 128
    moe_topk: int = 12
    expert_ffn_hidden_size: int = 2048
    routed_scaling_factor: float = 9.0
    # None = dropless (sort + ragged_dot); a float = fixed per-expert capacity ceil(cf * tokens * k / E).
    capacity_factor: float | None = None
    # Expected real (non-zero) experts per token, for the "average activated" figure only. None assumes #
    # uniform routing over all slots; LongCat-2.0 uses the balancing target K_e
    # (docs/architecture.md#balance).
    expected_real_experts: float | None = None

    # --- N-gram embedding (docs/architecture.md#ngram); ngram_n = 0 switches it off --------------------
    ngram_n: int = 5  # oe_neighbor_num: orders 2..n
    ngram_splits: int = 4  # oe_split_num: hash functions per order
    ngram_vocab_ratio: float = 100.567  # table rows M = int(ratio * vocab)
    ngram_dim: int = 512  # width of each branch table

    # --- Lightning indexer and LSA (docs/architecture.md#lsa); use_indexer = False is dense MLA -------------
    use_indexer: bool = True
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_rope_interleave: bool = True
    index_k_norm_eps: float = 1e-5
    # SI: sinks plus local window forced into the top-k set. Off = plain DSA token top-k.
    si_enabled: bool = True
    index_init_tokens: int = 16
    index_local_tokens: int = 1024
    # CLI: 2 = sublayer 0 owns the indexer, sublayer 1 reuses its indices; 1 = every sublayer owns one.
    cli_factor: int = 2
    # HI: coarse block scoring then token top-k inside the best blocks, used when the key length > hi_min_len.
    hi_enabled: bool = False
    hi_block_size: int = 128
    hi_top_blocks: int = 32
    hi_min_len: int = 131072

    # --- MTP (docs/architecture.md#mtp); mtp_num_steps = 0 switches it off ------------------------------
    mtp_num_steps: int = 3
    mtp_hidden_source: Literal["pre_norm", "post_norm"] = "pre_norm"

    # --- Tokens ---------------------------------------------------------------------------------------
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    # --- Dtypes (norms, softmax, router and indexer scores are always f32) -----------------------------
    param_dtype: str = "float32"
    dtype: str = "float32"

    # --- Implementation of LSA and the N-gram lookup (same numbers, different memory) ----------------------
    # "reference" materialises [T, S] scores and masks (the parity path); "xla" | "pallas" | "auto" run the
    # memory-bounded paths of pallas_kernels/ (auto = Pallas on GPU/TPU, XLA elsewhere).
    kernel_impl: Literal["reference", "auto", "xla", "pallas"] = "reference"

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"Config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        need(self.moe_topk <= self.num_slots,
             f"moe_topk {self.moe_topk} exceeds {self.num_slots} expert slots")
        need(self.ngram_n == 0 or self.ngram_n >= 2, "ngram_n must be 0 (off) or >= 2")
        if self.ngram_n:
            need(self.ngram_splits >= 1, "ngram_splits must be >= 1")
            # Exact uint32 hashing needs every table modulus below 2**30 (see ngram.py).
            need(max(self.ngram_table_rows) < 2**30, "N-gram table rows must stay below 2**30")
        if self.use_indexer:
            need(self.cli_factor in (1, 2), "cli_factor must be 1 or 2 (reuse never crosses a decoder layer)")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim must cover the rope dims")
            if self.si_enabled:
                need(
                    self.index_init_tokens + self.index_local_tokens < self.index_topk,
                    "SI forced set (init + local tokens) must leave dynamic top-k slots",
                )
            if self.hi_enabled and self.si_enabled:
                need(
                    self.index_local_tokens >= self.hi_block_size,
                    "HI needs index_local_tokens >= hi_block_size so candidate blocks hold only past keys",
                )
        need(self.mtp_num_steps >= 0, "mtp_num_steps must be >= 0")
        need(self.mtp_hidden_source in ("pre_norm", "post_norm"), "mtp_hidden_source: pre_norm | post_norm")
        need(self.kernel_impl in ("reference", "auto", "xla", "pallas"),
             f"kernel_impl must be reference | auto | xla | pallas, got {self.kernel_impl!r}")
        for name in ("param_dtype", "dtype"):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

    # --- Derived -----------------------------------------------------------------------------------------
    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    @property
    def num_slots(self) -> int:
        return self.n_routed_experts + self.zero_expert_num

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def q_scale(self) -> float:
        return math.sqrt(self.hidden_size / self.q_lora_rank) if self.mla_scale_q_lora else 1.0

    @property
    def kv_scale(self) -> float:
        return math.sqrt(self.hidden_size / self.kv_lora_rank) if self.mla_scale_kv_lora else 1.0

    @property
    def softmax_scale(self) -> float:
        """192^-0.5 times the YaRN logit factor mscale(f, mscale_all_dim)^2 (docs/architecture.md#mla)."""
        m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
        return self.qk_head_dim**-0.5 * m * m

    @property
    def ngram_branches(self) -> int:
        return (self.ngram_n - 1) * self.ngram_splits if self.ngram_n else 0

    @property
    def ngram_table_rows(self) -> tuple[int, ...]:
        """Rows of branch table i: M + 2i + 1 with M = int(ratio * V) (docs/architecture.md#ngram)."""
        base = int(self.ngram_vocab_ratio * self.vocab_size)
        return tuple(base + 2 * i + 1 for i in range(self.ngram_branches))

    @property
    def indexer_sublayers(self) -> int:
        """Indexers per decoder layer: 1 under CLI (owner = sublayer 0), 2 without."""
        return (2 // self.cli_factor) if self.use_indexer else 0

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    # --- Presets -----------------------------------------------------------------------------------------
    @classmethod
    def longcat_2(cls, **changes) -> Config:
        """LongCat-2.0, 1.6T total / ~48B active (docs/architecture.md#presets)."""
        return cls(expected_real_experts=7.8, **changes)

    @classmethod
    def longcat_flash(cls, **changes) -> Config:
        """LongCat-Flash, 560B: no N-gram embedding, no indexer, one dense MTP block
        (docs/architecture.md#presets)."""
        base = dict(
            vocab_size=131072, hidden_size=6144, num_layers=28, n_routed_experts=512, zero_expert_num=256,
            routed_scaling_factor=6.0, rope_theta=1e7, rope_factor=1.0, max_position_embeddings=131072,
            ngram_n=0, use_indexer=False, si_enabled=False, mtp_num_steps=1,
        )
        return cls(**{**base, **changes})

    @classmethod
    def longcat_flash_lite(cls, **changes) -> Config:
        """LongCat-Flash-Lite, 68.5B: 12 N-gram branches of 256-d, no indexer
        (docs/architecture.md#presets)."""
        base = dict(
            vocab_size=131072, hidden_size=3072, num_layers=14, num_heads=32, ffn_hidden_size=6144,
            expert_ffn_hidden_size=1024, n_routed_experts=256, zero_expert_num=128, routed_scaling_factor=6.0,
            rope_theta=5e6, rope_factor=1.0, max_position_embeddings=327680, ngram_n=4, ngram_splits=4,
            ngram_vocab_ratio=78.0, ngram_dim=256, use_indexer=False, si_enabled=False, mtp_num_steps=3,
        )
        return cls(**{**base, **changes})

    @classmethod
    def small(cls, **changes) -> Config:
        """About 200M total parameters with every feature on, for CPU benchmarks."""
        base = dict(
            vocab_size=32768, hidden_size=512, num_layers=4, num_heads=8, q_lora_rank=192, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn_hidden_size=1536,
            expert_ffn_hidden_size=256, n_routed_experts=32, zero_expert_num=8, moe_topk=4,
            routed_scaling_factor=2.0, rope_theta=1e6, rope_factor=1.0, max_position_embeddings=65536,
            ngram_n=3, ngram_splits=2, ngram_vocab_ratio=4.0, ngram_dim=128,
            index_n_heads=8, index_head_dim=64, index_topk=512, index_init_tokens=16, index_local_tokens=256,
            hi_enabled=True, hi_block_size=64, hi_top_blocks=16, hi_min_len=4096,
        )
        return cls(**{**base, **changes})

    @classmethod
    def tiny(cls, **changes) -> Config:
        """Every feature on (N-gram, LSA with SI + CLI + HI, ScMoE with zero experts, 3-step MTP),
        seconds on CPU."""
        base = dict(
            vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_size=128,
            expert_ffn_hidden_size=32, n_routed_experts=6, zero_expert_num=2, moe_topk=3,
            routed_scaling_factor=2.0, rope_theta=1e4, rope_factor=4.0, rope_original_max_position=64,
            max_position_embeddings=256, ngram_n=3, ngram_splits=2, ngram_vocab_ratio=2.3, ngram_dim=16,
            index_n_heads=2, index_head_dim=16, index_topk=16, index_init_tokens=2, index_local_tokens=4,
            hi_enabled=True, hi_block_size=4, hi_top_blocks=3, hi_min_len=24,
        )
        return cls(**{**base, **changes})

    PRESETS = ("tiny", "small", "longcat_flash", "longcat_flash_lite", "longcat_2")

    @classmethod
    def preset(cls, name: str, **changes) -> Config:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)(**changes)


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek-YaRN magnitude factor: 0.1 * m * ln(f) + 1 for f > 1, else 1 (docs/architecture.md#rope)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1.0 else 1.0
