"""Shared test helpers: matrix samplers and small multi-task models."""
