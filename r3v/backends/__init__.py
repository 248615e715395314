"""Generation backends: one module per backend, named after it (r3v.registry finds and imports them)."""
