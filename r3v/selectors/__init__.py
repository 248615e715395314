"""Test-time selectors. Each module registers one selector on import."""

from r3v.selectors import first, majority, oracle, self_select  # noqa: F401
