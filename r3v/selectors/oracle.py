"""``oracle``: the pass@N upper bound; right whenever any candidate is right."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r3v.records import Choice, Example, Sample
from r3v.registry import selectors
from r3v.selectors.base import ORACLE

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


@selectors.register(ORACLE)
class OracleSelector:
    """Upper bound (pass@N): correct if any candidate is correct; uses the gold verdicts."""

    name = ORACLE

    def select(self, task: Task, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice:
        for candidate in candidates:
            if candidate.correct:
                return Choice(answer=candidate.answer, correct=True)
        # Nothing right: report the first candidate's answer so the item still shows what was said.
        return Choice(answer=candidates[0].answer if candidates else None, correct=False)
