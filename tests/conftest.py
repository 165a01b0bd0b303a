"""Test set-up: simulated CPU devices for mesh tests (must be set before jax initialises)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
