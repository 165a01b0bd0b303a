"""Pure math shared by the model and the kernels (`pallas_kernels/`), with no module state: masks, softmax,
the indexer's scoring and top-k rules, block keys, the N-gram hash plan, query blocks."""
