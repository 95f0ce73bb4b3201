"""The environment under MLX: which BLAS it calls, its CPU compile cache, work-arounds applied before mlx-lm loads."""
