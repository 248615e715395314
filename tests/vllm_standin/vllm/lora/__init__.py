"""STAND-IN for ``vllm.lora`` (tests only)."""
