"""Decoding: the lone stream, prefill shapes, sampling, warm-up, step rules, KV reuse, the CPU decode step."""
