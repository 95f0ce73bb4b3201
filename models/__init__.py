"""MLX side of dtype-serve: dtypes, loading, memory, generation.

Nothing here imports mlx at package import time, so that `models.platform.blas` can put an
optimized BLAS in place before MLX is first imported. What does happen at import: MLX's
CPU kernel compiles are pointed at this user's own cache (models.platform.compile_cache), before
anything can compile one.
"""

from models.platform.compile_cache import use_private_compile_cache

use_private_compile_cache()
