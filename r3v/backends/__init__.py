"""Generation backends. Each module registers one backend on import."""

from r3v.backends import hf  # noqa: F401
from r3v.backends import openai  # noqa: F401
from r3v.backends import vllm  # noqa: F401
