"""The backend protocol: chat requests with images in, n completions per request out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass
class Request:
    """One chat turn for the model: a user message of images then text.

    ``messages`` is the HF chat format; ``images`` are the PIL images its ``{"type": "image"}``
    parts refer to, in order.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)

    @classmethod
    def user(cls, text: str, images: list[Image.Image] | None = None) -> Request:
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return cls(messages=[{"role": "user", "content": content}], images=images)

    @property
    def text(self) -> str:
        """All text parts, joined: what a backend without images would see."""
        parts = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [p["text"] for p in content if p.get("type") == "text"]
        return "\n".join(parts)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``greedy`` ignores temperature, top_p and top_k."""

    n: int = 1
    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 384
    seed: int = 0
    greedy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def greedy_decoding(cls, max_new_tokens: int = 512, seed: int = 0) -> Sampling:
        return cls(n=1, greedy=True, max_new_tokens=max_new_tokens, seed=seed)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)


@runtime_checkable
class Backend(Protocol):
    model_id: str

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        """``sampling.n`` completions for each request, in request order.

        The same requests, sampling settings and seed give the same completions.
        """


def generate_groups(backend: Backend, groups: list[tuple[list[Request], Sampling]]) -> list[list[list[Completion]]]:
    """Completions for several (requests, sampling) groups, each with its own seed.

    The result equals ``[backend.generate(requests, sampling) for requests, sampling in groups]``.
    A backend that can serve many groups in one engine call (vLLM: hundreds of prompts at once)
    defines ``generate_groups`` itself; the seeds stay per group, so a sample never depends on
    which other groups shared its call.
    """
    own = getattr(backend, "generate_groups", None)
    if callable(own):
        return own(groups)
    return [backend.generate(requests, sampling) for requests, sampling in groups]
