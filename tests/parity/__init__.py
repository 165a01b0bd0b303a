"""Whole-model parity with transformers through the loading code real checkpoints use."""
