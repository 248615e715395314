"""STAND-IN for ``vllm.v1.engine`` (tests only)."""
