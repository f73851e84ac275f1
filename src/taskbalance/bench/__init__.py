"""Benchmarks (optional extra): real datasets, models, runner and reports."""
