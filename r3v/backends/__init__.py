"""Generation backends. Each module registers one backend on import."""

from r3v.backends import hf  # noqa: F401
