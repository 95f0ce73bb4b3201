"""The project's bundled default language model (tiny-arith) and the code that reproduces it.

Importing this package does not import mlx (see models.platform.blas: the BLAS must be chosen first).
"""
