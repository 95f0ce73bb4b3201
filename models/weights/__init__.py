"""Weights and memory: precision names, checkpoint headers, estimates, loading (cast or quantize), residency."""
