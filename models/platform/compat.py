"""Work-arounds for the environment, applied before mlx-lm is first imported."""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.platform.blas import BlasInfo

# MLX's CUDA backend runs attention through cuDNN graphs built per shape: every new prompt length
# (and batch size) stalls ~80 ms to build one. Its own kernels need no build; operators may set 1.
CUDNN_ATTENTION = "MLX_CUDA_USE_CUDNN_SDPA"


def configure_cuda_attention() -> None:
    os.environ.setdefault(CUDNN_ATTENTION, "0")


def import_mlx_lm() -> None:
    """Import mlx-lm where the open-files hard limit is below 4096 (some containers and chroots).

    mlx_lm.utils raises RLIMIT_NOFILE to (2048, 4096) at import and fails where the hard limit is
    lower; clamp its request to the hard limit instead of crashing.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= 4096:
        import mlx_lm.utils  # noqa: F401
        return
    original = resource.setrlimit

    def clamped(kind: int, limits: tuple[int, int]) -> None:
        if kind == resource.RLIMIT_NOFILE:
            limits = (min(limits[0], hard), min(limits[1], hard))
        original(kind, limits)

    resource.setrlimit = clamped
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = original


def prepare_mlx(blas: str = "auto", threads: int | None = None) -> BlasInfo:
    """What must happen before MLX is first used, in order (server, `compare`, benchmark baselines):
    the attention setting, the BLAS (before mlx is imported), then mlx-lm's import."""
    from models.platform.blas import configure_blas

    configure_cuda_attention()
    info = configure_blas(blas, threads)
    import_mlx_lm()
    return info
