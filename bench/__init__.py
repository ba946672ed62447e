"""Benchmarks and evaluations (read ../shared/; never run by the unit tests)."""
