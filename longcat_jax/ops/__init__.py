"""Pure math shared by the model (`longcat_jax.model`) and the kernels (`pallas_kernels`), with no module
state. The model imports the kernels and both import this package; nothing here imports either of them.

  masks           causal / selection masks [B, T, S] and the masked f32 softmax
  indexer_scores  the lightning indexer's weighted-ReLU scores
  lsa_rules       SI's forced keys, when HI runs, top-K with -1 for empty picks
  block_keys      HI's mean key per block of positions
  ngram_hash      the N-gram hash plan, EOS-segmented windows and the concatenated table's layout
  query_blocks    blocks of queries for the linear-memory paths
"""
