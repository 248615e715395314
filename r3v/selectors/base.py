"""The selector protocol: pick one answer for an example from its sampled candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from r3v.records import Choice, Example, Sample

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

#: The built-in selectors' names (their modules: first.py, majority.py, self_select.py, oracle.py).
FIRST, MAJORITY, SELF_SELECT, ORACLE = "first", "majority", "self-select", "oracle"
#: Every built-in selector, in the order results report them.
ALL = (FIRST, MAJORITY, SELF_SELECT, ORACLE)
#: Selectors every comparison reports beside the chosen ones: Test@1, majority vote and the pass@N
#: bound. None of them calls the model.
BASELINES = (FIRST, MAJORITY, ORACLE)
#: The short name of each built-in selector's metric (``maj@k``); any other selector ``x`` is ``x@k``.
METRIC_PREFIX = {FIRST: "first", MAJORITY: "maj", SELF_SELECT: "sel", ORACLE: "oracle"}


@runtime_checkable
class Selector(Protocol):
    name: str

    def select(self, task: Task, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice: ...
