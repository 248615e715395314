"""STAND-IN for ``vllm.exceptions`` (tests only): the vLLM 0.33 error classes the stand-in raises.

Real vLLM splits its errors into client errors (caused by the request) and server errors (caused by
the engine). ``VLLMValidationError`` keeps the real ``parameter`` / ``value`` extras in its text.
"""

from __future__ import annotations

from typing import Any


class VLLMError(Exception):
    """Base class for all vLLM-specific errors."""


class VLLMClientError(VLLMError):
    """Errors caused by the client request."""


class VLLMServerError(VLLMError):
    """Errors caused by the server."""


class VLLMValidationError(VLLMClientError):
    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = [f"{k}={v}" for k, v in (("parameter", self.parameter), ("value", self.value)) if v is not None]
        return f"{base} ({', '.join(extras)})" if extras else base
