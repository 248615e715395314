"""STAND-IN for ``vllm.v1`` (tests only)."""
