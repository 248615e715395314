"""``first``: Test@1, the answer of the first sampled candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r3v.records import Choice, Example, Sample
from r3v.registry import selectors
from r3v.selectors.base import FIRST

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


@selectors.register(FIRST)
class FirstSelector:
    """Test@1: keep the first candidate's answer (no model call)."""

    name = FIRST

    def select(self, task: Task, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice:
        if not candidates:
            return Choice(answer=None, correct=False)
        head = candidates[0]
        return Choice(answer=head.answer, correct=head.correct)
