"""The engine: the front end the server calls, the one MLX worker thread, scheduling of requests."""
