"""Benchmark adapters: one module per task, named after it (r3v.registry finds and imports them)."""
