"""Test-time selectors. Each module registers one selector on import."""
