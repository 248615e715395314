"""STAND-IN for ``vllm.entrypoints`` (tests only)."""
