"""Benchmarks: `python -m bench.kernels`."""
