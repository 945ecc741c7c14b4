"""Benchmarks: measurements, not tests. Run one with `python -m benchmarks.<name>`."""
