"""The network's modules: each against transformers or a numpy reference."""
