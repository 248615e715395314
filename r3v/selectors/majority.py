"""``majority``: majority vote over normalised extracted answers.

Votes are cast on ``task.normalize(answer, example)``, never on raw text, so "Answer: 5" and
"Answer: 5." count as one answer when the task says they are equal. Candidates without an
extracted answer abstain. A tie goes to the tied answer whose first vote comes earliest in the
candidate list: deterministic, and it favours the first sample as Test@1 does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r3v.records import Choice, Example, Sample
from r3v.registry import selectors
from r3v.selectors.base import MAJORITY

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


def majority_vote(task: Task, example: Example, candidates: list[Sample]) -> Sample | None:
    """The first candidate of the winning answer, or None when no candidate has an answer."""
    votes: dict[str, int] = {}
    first_of: dict[str, Sample] = {}
    for candidate in candidates:
        if candidate.answer is None:
            continue
        key = task.normalize(candidate.answer, example)
        votes[key] = votes.get(key, 0) + 1
        first_of.setdefault(key, candidate)
    if not votes:
        return None
    # dicts keep insertion order, so max() over them returns the earliest answer among equals
    winner = max(votes, key=lambda key: votes[key])
    return first_of[winner]


@selectors.register(MAJORITY)
class MajoritySelector:
    """Majority vote over normalised answers; ties go to the answer seen first."""

    name = MAJORITY

    def select(self, task: Task, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice:
        winner = majority_vote(task, example, candidates)
        if winner is None:
            return Choice(answer=None, correct=False)
        return Choice(answer=winner.answer, correct=winner.correct)
