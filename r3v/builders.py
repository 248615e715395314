"""Turn a pool of scored samples into R3V's self-training items.

Per train question, over the samples of every earlier iteration (oldest model first):

- **self-CoT**: the newest correct sample, as the target of the CoT prompt;
- **self-refine**: the newest wrong sample in (``r3v.prompts.refine_prompt``), the newest correct
  sample out;
- **self-select**: numbered candidate sets (``r3v.prompts.select_prompt``) mixing correct and wrong
  samples; the target is the gold answer line, the bare gold value (both as official code does,
  per task) or the chosen solution.

Optionally (reference B) samples that are no rationale (too short, or opening with "Answer") are
left out of all three first.

"Newest" is decided by the ``iteration`` field, then the sample index: never by file dates.
Identical candidates (same text once stripped) collapse to their newest copy before anything is
built, so a select set never offers the same solution twice. Every shuffle is seeded from
(seed, example id, iteration, ...), so the same pool always gives the same items.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r3v.config import BuildConfig
from r3v.errors import DataError
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import KINDS, Example, Sample, TrainItem
from r3v.seeds import seeded_rng

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

#: How a bare answer opens; reference B's filter drops samples that start with it.
ANSWER_MARKER = "Answer"


@dataclass
class BuildResult:
    """The items of one iteration's mixture and what went into it."""

    items: list[TrainItem]
    #: Items per kind (qa, distill, cot, refine, select).
    counts: dict[str, int]
    #: Questions by pool outcome, plus duplicates removed and select items per set size.
    stats: dict[str, Any] = field(default_factory=dict)


def recency_key(sample: Sample) -> tuple[int, int]:
    """Older first: by iteration (None counts as oldest), then sample index."""
    return (-1 if sample.iteration is None else sample.iteration, sample.sample_index)


def pool_by_example(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped per question, each list ordered oldest to newest.

    A (iteration, sample index) pair that occurs twice for one question means two stores were
    mixed up; that is refused rather than guessed.
    """
    pool: dict[str, list[Sample]] = {}
    for sample in samples:
        pool.setdefault(sample.example_id, []).append(sample)
    for example_id, group in pool.items():
        group.sort(key=recency_key)
        keys = [recency_key(s) for s in group]
        if len(set(keys)) != len(keys):
            twice = sorted(k for k, n in Counter(keys).items() if n > 1)
            raise DataError(
                f"the pool holds the same (iteration, sample index) twice: {twice}", record=example_id
            )
    return pool


_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/×÷])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def written_equations(text: str) -> list[tuple[str, str, str, str]]:
    """The two-operand equations written out in ``text``: ``7 - 3 = 4`` gives ("7", "-", "3", "4")."""
    return _EQUATION.findall(text)


def equations_hold(text: str) -> bool:
    """Whether every equation written out in ``text`` is arithmetically right (a result rounded to
    2 places passes); text without one passes. A right final answer reached through a wrong step
    is luck, and training on it teaches the wrong step."""
    for left, op, right, result in written_equations(text):
        a, b, c = float(left), float(right), float(result)
        if op in "/÷" and b == 0:
            return False
        value = {"+": a + b, "-": a - b, "*": a * b, "×": a * b, "/": a / b if b else 0, "÷": a / b if b else 0}[op]
        if abs(value - c) > 1e-6 * max(1.0, abs(value)) and round(value, 2) != c:
            return False
    return True


def dedupe(group: Sequence[Sample]) -> list[Sample]:
    """Keep the newest copy of each distinct stripped text, in oldest-to-newest order."""
    newest_position = {s.text.strip(): i for i, s in enumerate(group)}
    return [s for i, s in enumerate(group) if newest_position[s.text.strip()] == i]


def is_rationale(text: str, config: BuildConfig) -> bool:
    """Whether a sample reasons before it answers: longer than ``rationale_min_chars`` and, with
    ``drop_answer_first``, not opening with the answer marker (reference B's filter)."""
    if len(text) <= config.rationale_min_chars:
        return False
    return not (config.drop_answer_first and text.startswith(ANSWER_MARKER))


def short_answer(task: Task, example: Example) -> str:
    """The bare answer a direct-answer (QA) item is trained to give: ``task.qa_target`` when the
    task has one, else the gold answer as text."""
    return str(task.qa_target(example) if task.qa_target is not None else example.answer)


def self_cot_item(task: Task, example: Example, correct: Sequence[Sample]) -> TrainItem:
    return TrainItem("cot", example.id, task.cot_prompt(example), correct[-1].text.strip())


def self_refine_item(task: Task, example: Example, correct: Sequence[Sample], wrong: Sequence[Sample]) -> TrainItem:
    prompt = refine_prompt(task, example, wrong[-1].text)
    return TrainItem("refine", example.id, prompt, correct[-1].text.strip())


def select_sets(correct: Sequence[Sample], wrong: Sequence[Sample], size: int) -> list[tuple[list[Sample], list[Sample]]]:
    """The (correct, wrong) candidate sets of one size, newest samples first.

    One set leans correct (up to size-1 correct, the rest wrong), one leans wrong (up to size-1
    wrong, the rest correct). For size 3 this is the reference's rule: 2 correct + 1 wrong when
    there are two correct samples, 1 correct + 2 wrong when there are two wrong ones. A set needs
    at least one of each and exactly ``size`` candidates; two identical compositions count once.
    """
    newest_correct, newest_wrong = list(reversed(correct)), list(reversed(wrong))
    sets: list[tuple[list[Sample], list[Sample]]] = []
    seen: set[tuple[int, int]] = set()
    for lean_correct in (True, False):
        if lean_correct:
            n_correct = min(len(correct), size - 1)
            n_wrong = size - n_correct
        else:
            n_wrong = min(len(wrong), size - 1)
            n_correct = size - n_wrong
        if n_correct < 1 or n_wrong < 1 or n_correct > len(correct) or n_wrong > len(wrong):
            continue
        if (n_correct, n_wrong) in seen:
            continue
        seen.add((n_correct, n_wrong))
        sets.append((newest_correct[:n_correct], newest_wrong[:n_wrong]))
    return sets


def select_sizes_for(example: Example, config: BuildConfig, iteration: int) -> tuple[int, ...]:
    """The candidate-set sizes one question trains on this iteration: every size, or with
    ``select_sizes_per_question`` that many drawn (seeded per question and iteration), in order."""
    if not config.select_sizes_per_question:
        return tuple(config.select_sizes)
    drawn = seeded_rng(config.seed, example.id, iteration, "select_sizes").sample(
        list(config.select_sizes), config.select_sizes_per_question
    )
    return tuple(sorted(drawn))


def self_select_items(
    task: Task,
    example: Example,
    correct: Sequence[Sample],
    wrong: Sequence[Sample],
    config: BuildConfig,
    iteration: int,
    stats: Counter | None = None,
) -> list[TrainItem]:
    items = []
    for size in select_sizes_for(example, config, iteration):
        for rule, (chosen_correct, chosen_wrong) in enumerate(select_sets(correct, wrong, size)[: config.select_per_size]):
            candidates = [*chosen_correct, *chosen_wrong]
            # The position of the right answer must carry no signal: shuffle, seeded per set.
            seeded_rng(config.seed, example.id, iteration, "select", size, rule).shuffle(candidates)
            prompt = select_prompt(task, example, [c.text for c in candidates])
            if config.select_target == "answer":
                target = task.answer_line(example.answer, example)
            elif config.select_target == "value":
                target = short_answer(task, example)
            else:
                target = chosen_correct[0].text.strip()  # the newest correct candidate
            items.append(TrainItem("select", example.id, prompt, target))
            if stats is not None:
                stats[f"select_size_{size}"] += 1
    return items


def build_self_items(
    task: Task,
    examples: Sequence[Example],
    samples: Iterable[Sample],
    config: BuildConfig,
    iteration: int,
) -> BuildResult:
    """Self-CoT, self-refine and self-select items from a pool of all earlier iterations' samples.

    Questions whose samples are all correct give only self-CoT; all wrong give nothing.
    ``iteration`` is the iteration being trained; it seeds the shuffles.
    """
    if config.check_steps and task.check_steps is None:
        raise ValueError(f"build.check_steps: task {task.name!r} has no step checker (check_steps)")
    by_id = {ex.id: ex for ex in examples}
    pool = pool_by_example(samples)
    unknown = sorted(set(pool) - set(by_id))
    if unknown:
        raise DataError(
            f"{len(unknown)} question(s) in the sample pool are not in the task's train split "
            f"(first: {unknown[0]!r}); were the samples made with another --train-limit or data dir?"
        )
    items: list[TrainItem] = []
    stats: Counter = Counter()
    negative_shares: list[float] = []
    if not pool:  # iteration 0: nothing sampled yet, nothing to report
        return BuildResult(items, count_kinds(items), {})
    for example in examples:
        group = pool.get(example.id, [])
        if not group:
            stats["questions_unsampled"] += 1
            continue
        if config.dedup:
            kept = dedupe(group)
            stats["duplicates_removed"] += len(group) - len(kept)
            group = kept
        if config.rationale_min_chars or config.drop_answer_first:
            kept = [s for s in group if is_rationale(s.text, config)]
            stats["not_rationales_removed"] += len(group) - len(kept)
            group = kept
        correct = [s for s in group if s.correct]
        wrong = [s for s in group if not s.correct]
        stats["positives"] += len(correct)
        stats["negatives"] += len(wrong)
        if group:
            negative_shares.append(len(wrong) / len(group))
        if task.check_steps is not None:
            stats["positives_passing_step_check"] += sum(bool(task.check_steps(s.text, example)) for s in correct)
        if config.check_equations:
            checked = [s for s in correct if equations_hold(s.text)]
            stats["positives_failing_equations"] += len(correct) - len(checked)
            correct = checked
        if config.check_steps:
            checked = [s for s in correct if task.check_steps(s.text, example)]
            stats["positives_failing_step_check"] += len(correct) - len(checked)
            correct = checked
        if not correct:
            stats["questions_all_wrong"] += 1
            continue
        stats["questions_all_correct" if not wrong else "questions_mixed"] += 1
        if config.self_cot:
            items.append(self_cot_item(task, example, correct))
        if not wrong:
            continue
        if config.self_refine:
            items.append(self_refine_item(task, example, correct, wrong))
        if config.self_select:
            items += self_select_items(task, example, correct, wrong, config, iteration, stats)
    result = dict(sorted(stats.items()))
    if negative_shares:
        result["negative_share_per_question"] = sum(negative_shares) / len(negative_shares)
    return BuildResult(items, count_kinds(items), result)


def qa_items(task: Task, examples: Sequence[Example]) -> list[TrainItem]:
    """Direct-answer QA for every question: the QA prompt in, the bare answer out.

    A task's ``qa_target(example)`` gives it when its short answer is not ``str(example.answer)``.
    """
    return [TrainItem("qa", ex.id, task.qa_prompt(ex), short_answer(task, ex)) for ex in examples]


def warmup_mixture(task: Task, examples: Sequence[Example], distill: Sequence[TrainItem]) -> list[TrainItem]:
    """Iteration 0's training data: QA for the whole train split plus the distilled CoT items."""
    return [*qa_items(task, examples), *distill]


def build_mixture(
    task: Task,
    examples: Sequence[Example],
    samples: Iterable[Sample],
    config: BuildConfig,
    iteration: int,
    warmup: Sequence[TrainItem] = (),
) -> BuildResult:
    """The full, shuffled training mixture of one iteration: warm-up items plus self items.

    At iteration 0 pass no samples: the result is the warm-up mixture alone.
    """
    result = build_self_items(task, examples, samples, config, iteration)
    items = [*(warmup if config.include_warmup or iteration == 0 else ()), *result.items]
    seeded_rng(config.seed, "mixture", iteration).shuffle(items)
    return BuildResult(items, count_kinds(items), result.stats)


def count_kinds(items: Iterable[TrainItem]) -> dict[str, int]:
    counts = Counter(item.kind for item in items)
    return {kind: counts.get(kind, 0) for kind in KINDS} | {k: v for k, v in counts.items() if k not in KINDS}

