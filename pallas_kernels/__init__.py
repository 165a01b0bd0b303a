"""Pallas kernels (sparse indexer, sparse MLA attention, N-gram lookup), each beside its pure-JAX reference.

Empty until the kernels issue: the references live in longcat_jax/indexer.py, mla.py and ngram.py.
"""
