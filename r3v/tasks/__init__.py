"""Benchmark adapters. Each module registers one task on import."""

from r3v.tasks import (
    chartqa,  # noqa: F401
    clevr_math,  # noqa: F401
    clevr_synth,  # noqa: F401
    geoqa,  # noqa: F401
    m3cot,  # noqa: F401
    miniwob,  # noqa: F401
    tabmwp,  # noqa: F401
)
