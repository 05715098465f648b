"""Benchmarks that print tables (``make bench`` / ``python -m bench.run_all``); never tests."""
