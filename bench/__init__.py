"""Benchmarks. Run from the repository root: ``python -m bench.run NAME`` (on the GPU machine)."""
