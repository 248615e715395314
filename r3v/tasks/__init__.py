"""Benchmark adapters. Each module registers one task on import."""

from r3v.tasks import clevr_synth  # noqa: F401
