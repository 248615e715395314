"""Test-time selectors: one module per selector, named after it (r3v.registry finds and imports them)."""
