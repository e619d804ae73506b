"""Helpers for tests and benchmarks (tiny random-weight checkpoints built on the spot)."""
