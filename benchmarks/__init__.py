"""Benchmarks: each module is runnable with ``python -m benchmarks.<name>`` and writes to ``benchmarks/results/``."""
