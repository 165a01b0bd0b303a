"""pallas_kernels/: every kernel path equal to its reference (Pallas in interpret mode on CPU)."""
