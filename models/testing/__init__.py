"""Synthetic checkpoints in the mlx-lm layout, for tests and benchmarks."""
