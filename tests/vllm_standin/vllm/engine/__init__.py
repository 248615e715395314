"""STAND-IN for ``vllm.engine`` (tests only)."""
