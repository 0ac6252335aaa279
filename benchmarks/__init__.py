"""Benchmarks: each module is an entry point, `python -m benchmarks.<name>`, writing benchmarks/results/<name>.json."""
