"""Benchmark scripts; a package so that tests import them (python -m pytest from the repository root)."""
