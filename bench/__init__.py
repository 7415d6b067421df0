"""Benchmarks: run with ``python -m bench.<name>``; figures are printed, not asserted."""
