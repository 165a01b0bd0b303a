"""The network: layers, MLA, the lightning indexer and LSA selection, ScMoE, the N-gram embedding, MTP and the
decode cache. `longcat.py` assembles them into the model and its `forward` / `prefill` / `decode_step`."""
