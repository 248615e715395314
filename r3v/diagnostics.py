"""What selection costs and how it behaves, and what each iteration's sample pool looked like.

- **Compute.** Per selector and k: the tokens and seconds its answer cost. The k candidates share
  one prompt (the backends prefill it once and sample k continuations), so a question's prompt
  counts once, plus each used candidate's completion, plus the selector's own model call
  (self-select's, with its prompt of all k candidates); ``first`` uses only the first candidate.
  ``equal_compute`` then puts each selector next to majority vote at the same token budget.
- **Selection.** How often each shown position is picked, when that position's answer is unique
  among the candidates (with shuffled candidates the histogram should be flat); how often a right
  candidate is picked when one exists; what is answered when none is right; and how often
  self-select agrees with majority vote.
- **Pools.** Per iteration: the share of positives a task's step checker accepts, the share of
  negatives per question, and the questions whose pool is all right or all wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from r3v.records import Choice, Example, Sample
from r3v.selectors.base import FIRST, MAJORITY

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

#: Answers listed for the questions where no candidate is right.
TOP_ANSWERS = 5


@dataclass
class Cost:
    """Tokens and seconds spent on one question's answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    #: Model calls the selector made itself (beyond sampling the candidates).
    select_calls: int = 0

    def add(self, other: Cost) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.seconds += other.seconds
        self.select_calls += other.select_calls


def answer_cost(selector: str, candidates: Sequence[Sample], choice: Choice) -> Cost:
    """What ``selector``'s choice among ``candidates`` (the first k) cost, its own call included."""
    used = candidates[:1] if selector == FIRST else candidates
    made_call = choice.prompt_tokens > 0 or choice.completion_tokens > 0
    return Cost(
        prompt_tokens=(candidates[0].prompt_tokens if candidates else 0) + choice.prompt_tokens,
        completion_tokens=sum(s.completion_tokens for s in used) + choice.completion_tokens,
        seconds=sum(s.seconds for s in used) + choice.seconds,
        select_calls=int(made_call),
    )


def cost_summary(costs: Sequence[Cost], choices: Sequence[Choice]) -> dict[str, Any]:
    """Totals and per-question means of one selector's costs at one k, with its accuracy."""
    total = Cost()
    for cost in costs:
        total.add(cost)
    n = max(len(costs), 1)
    tokens = total.prompt_tokens + total.completion_tokens
    return {
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "tokens": tokens,
        "tokens_per_question": tokens / n,
        "seconds": round(total.seconds, 6),
        "seconds_per_question": total.seconds / n,
        "select_calls": total.select_calls,
        "accuracy": sum(c.correct for c in choices) / n,
    }


def equal_compute(compute: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per selector, one point per k: its tokens per question and accuracy, and majority vote's
    accuracy at the largest k whose tokens per question do not exceed these (None when even
    majority's smallest k costs more): a comparison at equal compute."""
    ks = sorted(compute, key=int)
    majority = [(compute[k][MAJORITY]["tokens_per_question"], compute[k][MAJORITY]["accuracy"], int(k))
                for k in ks if MAJORITY in compute[k]]
    points: dict[str, list[dict[str, Any]]] = {}
    for k in ks:
        for name, summary in compute[k].items():
            budget = summary["tokens_per_question"]
            affordable = [(acc, mk) for tokens, acc, mk in majority if tokens <= budget]
            best = max(affordable, key=lambda item: item[1]) if affordable else None
            points.setdefault(name, []).append({
                "k": int(k),
                "tokens_per_question": budget,
                "seconds_per_question": summary["seconds_per_question"],
                "accuracy": summary["accuracy"],
                "majority_k_at_this_budget": best[1] if best else None,
                "majority_accuracy_at_this_budget": best[0] if best else None,
            })
    return points


def _normalized(task: Task, example: Example, answer: str | None) -> str | None:
    return None if answer is None else task.normalize(answer, example)


def chosen_position(task: Task, example: Example, shown: Sequence[Sample], choice: Choice) -> int | None:
    """The 1-based shown position of the candidate whose answer was chosen, when exactly one
    candidate has that answer (with duplicates the position is ambiguous); else None."""
    chosen = _normalized(task, example, choice.answer)
    if chosen is None:
        return None
    hits = [i for i, s in enumerate(shown, start=1) if _normalized(task, example, s.answer) == chosen]
    return hits[0] if len(hits) == 1 else None


def selection_diagnostics(
    task: Task,
    examples: Sequence[Example],
    candidates: Sequence[Sequence[Sample]],
    choices: dict[str, Sequence[Choice]],
    shown: dict[str, Sequence[Sequence[Sample]]],
) -> dict[str, Any]:
    """Per selector (``choices``; ``shown``: the candidates in the order each selector saw them):
    position histogram, right-when-possible, answers when none is right; and the agreement of every
    selector with majority vote."""
    k = max((len(group) for group in candidates), default=0)
    out: dict[str, Any] = {}
    for name, picks in choices.items():
        positions: Counter = Counter()
        possible = right_when_possible = 0
        none_right: Counter = Counter()
        answers: Counter = Counter()
        for example, group, order, choice in zip(examples, candidates, shown[name], picks, strict=True):
            if choice.how in ("model", "rule"):  # a choice the selector made, not a skip or fallback
                position = chosen_position(task, example, order, choice)
                if position is not None:
                    positions[str(position)] += 1
            if any(s.correct for s in group):
                possible += 1
                right_when_possible += choice.correct
                continue
            chosen = _normalized(task, example, choice.answer)
            offered = {_normalized(task, example, s.answer) for s in group}
            none_right["abstained" if chosen is None else "a candidate's answer" if chosen in offered else "a new answer"] += 1
            if chosen is not None:
                answers[chosen] += 1
        out[name] = {
            "positions": {str(p): positions.get(str(p), 0) for p in range(1, k + 1)},
            "right_when_possible": right_when_possible / possible if possible else None,
            "questions_with_a_right_candidate": possible,
            "when_none_right": {"questions": len(examples) - possible,
                                **{key: none_right.get(key, 0) for key in ("abstained", "a candidate's answer", "a new answer")},
                                "top_answers": [[a, n] for a, n in answers.most_common(TOP_ANSWERS)]},
        }
    if MAJORITY in choices:
        for name, picks in choices.items():
            same = sum(_normalized(task, ex, a.answer) == _normalized(task, ex, b.answer)
                       for ex, a, b in zip(examples, picks, choices[MAJORITY], strict=True))
            out[name]["agreement_with_majority"] = same / len(examples) if examples else None
    return out


def pool_summary(stats: dict[str, Any]) -> dict[str, Any] | None:
    """An iteration's pool from the builder's stats: questions all right / mixed / all wrong, the
    mean share of negatives per question, and the share of positives a task's step checker accepts
    (None where the task has none). None before any sampling (iteration 0)."""
    sampled = sum(stats.get(key, 0) for key in ("questions_all_correct", "questions_mixed", "questions_all_wrong"))
    if not sampled:
        return None
    positives = stats.get("positives", 0)
    checked = stats.get("positives_passing_step_check")
    return {
        "questions": sampled,
        "all_right": stats.get("questions_all_correct", 0),
        "mixed": stats.get("questions_mixed", 0),
        "all_wrong": stats.get("questions_all_wrong", 0),
        "negative_share_per_question": stats.get("negative_share_per_question"),
        "positives": positives,
        "positives_steps_ok": None if checked is None or not positives else checked / positives,
    }
