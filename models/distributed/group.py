"""Joining the process group that mlx.launch (or a hosts file's environment) describes."""

from __future__ import annotations

import mlx.core as mx

from models.errors import EngineError

BACKENDS = ("any", "ring", "nccl", "jaccl", "mpi")
_group: mx.distributed.Group | None = None


class DistributedStartError(EngineError):
    """This process cannot take part in a distributed group (not started by mlx.launch, one rank only...)."""


def join_group(backend: str = "any") -> mx.distributed.Group:
    """This process's group (joined once; later calls return it). Needs 2 ranks or more."""
    global _group
    if _group is None:
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except (RuntimeError, ValueError) as e:
            raise DistributedStartError(
                f"--distributed: could not join a group with the {backend!r} backend ({e}); start every rank "
                "with mlx.launch or `dtype-serve launch` (docs/distributed.md)") from None
        if group.size() < 2:
            raise DistributedStartError("--distributed needs 2 ranks or more: start them with mlx.launch -n 2 or "
                                        "`dtype-serve launch -n 2` (docs/distributed.md)")
        _group = group
    return _group
