"""Pallas kernels (sparse indexer, sparse MLA attention, N-gram lookup), each beside its plain-JAX path.

Every entry point takes `impl="auto" | "xla" | "pallas"` (see `impl.py`); the dense references they are tested
against live in longcat_jax/model/indexer.py, mla.py and ngram.py.
"""
