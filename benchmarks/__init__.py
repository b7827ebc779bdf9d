"""Benchmarks of fedlit's round loop (run with `make bench`; results in docs/performance.md)."""
