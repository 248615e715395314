"""The selector protocol: pick one answer for an example from its sampled candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from r3v.records import Example, Sample


@dataclass
class Choice:
    """The answer a selector picked (None when no candidate has one), and how it got there."""

    answer: str | None
    correct: bool
    #: "model" (the model chose), "skipped" (all candidates agreed, no model call),
    #: "fallback" (model output unparseable, majority vote used), or "rule" (no model involved).
    how: str = "rule"
    raw_output: str | None = None


@runtime_checkable
class Selector(Protocol):
    name: str

    def select(self, task: Any, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice: ...
