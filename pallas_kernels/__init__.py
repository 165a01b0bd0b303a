"""Pallas kernels (sparse indexer, sparse MLA attention, N-gram lookup), each beside its plain-JAX path, and
the CPU serving step's C++ kernels (`cpu_serving`: few-row matmuls, grouped experts and paged decode
attention as XLA FFI custom calls).

Every Pallas entry point takes `impl="auto" | "xla" | "pallas"` (see `impl.py`); `cpu_serving` runs where
the CPU serving step asks for it (`small_rows`). The kernels import only
`longcat_jax.ops` (math they share with the model), `longcat_jax.config` and `sharding`; the model imports
the kernels, never the other way round.

Each kernel module's docstring names its plain-jnp reference on a "Reference:" line. Where the model's own
path computes the same thing, that path is the reference (`longcat_jax.model.indexer.select`,
`longcat_jax.model.ngram.ngram_embed`, `longcat_jax.model.indexer_loss.indexer_kl`); otherwise the reference
sits beside the kernel as `<entry point>_reference` (`indexer_blocks.select_blocks_reference`,
`sparse_mla.sparse_mla_reference`).
"""
