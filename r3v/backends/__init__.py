"""Generation backends. Each module registers one backend on import."""

from r3v.backends import (
    hf,  # noqa: F401
    openai,  # noqa: F401
    vllm,  # noqa: F401
)
