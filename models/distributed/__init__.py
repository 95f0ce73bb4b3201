"""Serving one model over several processes with MLX's own distributed layer (mlx.launch, its backends).

Rank 0 runs the whole engine and the HTTP server; every MLX step it takes on a model (load, drop, each
decoder call) is first broadcast through MLX collectives (`channel.py`) and replayed by the other ranks
(`follower.py`) on their shards, so all ranks run the same collectives in the same order. See
docs/distributed.md.
"""
