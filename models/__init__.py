"""MLX side of dtype-serve: dtypes, loading, memory, generation.

Nothing here imports mlx at package import time, so that `models.blas` can put an
optimized BLAS in place before MLX is first imported.
"""
