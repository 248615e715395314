"""``self-select``: the model reads its own candidates and names the answer (R3V test-time selection).

For each question the candidates are shuffled with a seed derived from (seed, example id), so the
order is the same on every run but the model cannot learn "the first one is right". They go into
the select prompt, and one greedy request per question asks the model for the final answer, which
the task extracts and scores like any other answer.

Two shortcuts, both counted, both on by default and both off in the reference (``--reference``),
which always calls the model and scores an unreadable output wrong:

- ``skipped``: every candidate has an answer and they all normalise to the same string, so there
  is nothing to choose and the model is not called (``skip_when_agree``).
- ``fallback``: the model's output has no parseable answer, so the majority vote decides
  (``unparseable="majority"``). With ``unparseable="wrong"`` such a choice is counted as
  ``unparseable`` and scored wrong.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from r3v.config import UNPARSEABLE_RULES
from r3v.prompts import select_prompt
from r3v.records import Choice, Example, Request, Sample, Sampling
from r3v.registry import selectors
from r3v.seeds import seeded_rng
from r3v.selectors.base import SELF_SELECT
from r3v.selectors.majority import majority_vote

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


@selectors.register(SELF_SELECT)
class SelfSelectSelector:
    """R3V self-select: the model picks among shuffled candidates (one greedy call; skips when all agree)."""

    name = SELF_SELECT

    def __init__(
        self, seed: int = 0, skip_when_agree: bool = True, max_new_tokens: int = 512, unparseable: str = "majority"
    ) -> None:
        if unparseable not in UNPARSEABLE_RULES:
            raise ValueError(f"unparseable must be one of {', '.join(UNPARSEABLE_RULES)}, got {unparseable!r}")
        self.seed = seed
        self.skip_when_agree = skip_when_agree
        self.max_new_tokens = max_new_tokens
        self.unparseable = unparseable
        #: How each selection was made since this selector was built: model, skipped, fallback, unparseable.
        self.counts = {"model": 0, "skipped": 0, "fallback": 0, "unparseable": 0}

    def shuffled(self, example: Example, candidates: Sequence[Sample]) -> list[Sample]:
        order = list(candidates)
        seeded_rng(self.seed, example.id).shuffle(order)
        return order

    def prompt(self, task: Task, example: Example, candidates: Sequence[Sample]) -> str:
        return select_prompt(task, example, [c.text for c in self.shuffled(example, candidates)])

    def select(self, task: Task, example: Example, candidates: list[Sample], backend: Any | None = None) -> Choice:
        return self.select_many(task, [example], {example.id: candidates}, backend)[0]

    def select_many(
        self,
        task: Task,
        examples: Sequence[Example],
        candidates_by_id: dict[str, list[Sample]],
        backend: Any | None = None,
    ) -> list[Choice]:
        """Select for many questions with a single ``backend.generate`` call for all that need the model."""
        choices: list[Choice | None] = []
        pending: list[int] = []  # positions in ``examples`` that need the model
        for position, example in enumerate(examples):
            candidates = candidates_by_id.get(example.id) or []
            if not candidates:
                raise ValueError(f"self-select: no candidates for example {example.id!r}")
            if self.skip_when_agree and _all_agree(task, example, candidates):
                choices.append(Choice(candidates[0].answer, candidates[0].correct, how="skipped"))
            else:
                choices.append(None)
                pending.append(position)

        if pending:
            if backend is None:
                raise ValueError("self-select needs a backend: the candidates disagree, so the model must choose")
            requests = [
                Request.user(
                    self.prompt(task, examples[i], candidates_by_id[examples[i].id]), examples[i].load_images()
                )
                for i in pending
            ]
            sampling = Sampling.greedy_decoding(max_new_tokens=self.max_new_tokens, seed=self.seed)
            started = time.perf_counter()
            outputs = backend.generate(requests, sampling)
            share = (time.perf_counter() - started) / len(pending)  # one batched call: an even share each
            for i, completions in zip(pending, outputs, strict=True):
                example = examples[i]
                choice = self.judge(task, example, candidates_by_id[example.id], completions[0].text)
                choice.prompt_tokens = completions[0].prompt_tokens
                choice.completion_tokens = completions[0].completion_tokens
                choice.seconds = round(share, 6)
                choices[i] = choice

        for choice in choices:
            self.counts[choice.how] += 1
        return choices  # type: ignore[return-value]  # every slot is filled above

    def judge(self, task: Task, example: Example, candidates: list[Sample], output: str) -> Choice:
        """Turn the model's select output into a Choice: its extracted answer, else the majority vote
        (or, with ``unparseable="wrong"``, no answer)."""
        answer = task.extract(output, example)
        if answer is not None:
            return Choice(answer, bool(task.is_correct(answer, example)), how="model", raw_output=output)
        if self.unparseable == "wrong":
            return Choice(None, False, how="unparseable", raw_output=output)
        winner = majority_vote(task, example, candidates)
        if winner is None:
            return Choice(None, False, how="fallback", raw_output=output)
        return Choice(winner.answer, winner.correct, how="fallback", raw_output=output)


def _all_agree(task: Task, example: Example, candidates: Sequence[Sample]) -> bool:
    """True when every candidate has an answer and all normalise to one string."""
    if any(c.answer is None for c in candidates):
        return False
    return len({task.normalize(c.answer, example) for c in candidates}) == 1
