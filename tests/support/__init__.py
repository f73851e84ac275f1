"""Shared test helpers: matrix samplers, small multi-task models and a tiny dataset."""
