"""The only code near mlx-lm's private names (pinned: mlx-lm 0.32.2).

dtype-serve extends mlx-lm's batched decoding by subclassing (`batch_generator`, `batch_cache`,
`decode_mask`) and reads a few private helpers (`internals`). Every private name it relies on is listed
in `contract`, checked at start-up (`check_contract`, logged and shown in /memory) and in the tests; where
one is missing the extension falls back to mlx-lm's own public path instead of failing. docs/mlx-lm.md
is the upgrade checklist.
"""
