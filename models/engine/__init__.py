"""The engine: the front end the server calls (engine.py), the one MLX worker thread (worker.py), per-variant
scheduling (scheduler.py over decoder.py), request state (sequence.py), delivery (outbox.py), the non-finite
policy (nonfinite.py), the dtype reports (reports.py), and one EngineConfig (config.py)."""
