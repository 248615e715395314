"""The backend protocol: chat requests with images in, n completions per request out.

The records it speaks (``Request``, ``Sampling``, ``Completion``) live in ``r3v.records``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from r3v.records import Completion, Request, Sampling


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
