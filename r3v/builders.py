"""Turn a pool of scored samples into R3V's self-training items.

Per train question, over the samples of every earlier iteration (oldest model first):

- **self-CoT**: the newest correct sample, as the target of the CoT prompt;
- **self-refine**: the newest wrong sample in (``r3v.prompts.refine_prompt``), the newest correct
  sample out;
- **self-select**: numbered candidate sets (``r3v.prompts.select_prompt``) mixing correct and wrong
  samples; the target is the gold answer line (the official code) or the chosen solution.

"Newest" is decided by the ``iteration`` field, then the sample index: never by file dates.
Identical candidates (same text once stripped) collapse to their newest copy before anything is
built, so a select set never offers the same solution twice. Every shuffle is seeded from
(seed, example id, iteration, ...), so the same pool always gives the same items.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r3v.errors import DataError
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import Example, Sample, TrainItem

#: Which self-generated objectives each method trains (warm-up data is always mixed in).
METHODS: dict[str, dict[str, bool]] = {
    "r3v": {"self_cot": True, "self_refine": True, "self_select": True},
    "star": {"self_cot": True, "self_refine": False, "self_select": False},
    "no_refine": {"self_cot": True, "self_refine": False, "self_select": True},
    "no_select": {"self_cot": True, "self_refine": True, "self_select": False},
}

#: Item kinds in the order counts are reported.
KINDS = ("qa", "distill", "cot", "refine", "select")

SELECT_TARGETS = ("answer", "solution")


@dataclass(frozen=True)
class BuildConfig:
    """How the self-training mixture is built from a sample pool."""

    #: Preset name, recorded in outputs: r3v | star | no_refine | no_select.
    method: str = "r3v"
    #: Train on the newest correct sample per question (STaR's rationale bootstrapping).
    self_cot: bool = True
    #: Train to turn the newest wrong sample into the newest correct one.
    self_refine: bool = True
    #: Train to pick the right answer among numbered candidates.
    self_select: bool = True
    #: Candidate-set sizes for self-select; each size gives up to ``select_per_size`` items per
    #: question. The reference uses (3,); a later variant trains on 2 to 6 for test-time scaling.
    select_sizes: tuple[int, ...] = (3,)
    #: Select items per question and size: at most one "mostly correct" and one "mostly wrong" set.
    select_per_size: int = 2
    #: "answer": the gold answer line (official code, default); "solution": the chosen sample's text.
    select_target: str = "answer"
    #: Collapse candidates with the same stripped text to their newest copy before building.
    dedup: bool = True
    #: Mix the warm-up items (direct-answer QA + distilled CoT) into every iteration, as R3V does.
    include_warmup: bool = True
    #: Use a right-answer sample as a positive only when every ``a + b = c`` (or -, *, /) step in it
    #: holds; the failures are neither positives nor negatives.
    check_equations: bool = False
    #: Base seed of every shuffle.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select_target not in SELECT_TARGETS:
            raise ValueError(f"select_target must be one of {', '.join(SELECT_TARGETS)}, not {self.select_target!r}")
        bad = [s for s in self.select_sizes if not 2 <= int(s) <= 6]
        if bad or not self.select_sizes:
            raise ValueError(f"select_sizes must be between 2 and 6 candidates, got {self.select_sizes}")
        if self.select_per_size not in (1, 2):
            raise ValueError("select_per_size must be 1 or 2")

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> BuildConfig:
        """The config of a named method (r3v, star, no_refine, no_select), with overrides."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return cls(method=method, **{**METHODS[method], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "self_cot": self.self_cot,
            "self_refine": self.self_refine,
            "self_select": self.self_select,
            "select_sizes": list(self.select_sizes),
            "select_per_size": self.select_per_size,
            "select_target": self.select_target,
            "dedup": self.dedup,
            "include_warmup": self.include_warmup,
            "check_equations": self.check_equations,
            "seed": self.seed,
        }


@dataclass
class BuildResult:
    """The items of one iteration's mixture and what went into it."""

    items: list[TrainItem]
    #: Items per kind (qa, distill, cot, refine, select).
    counts: dict[str, int]
    #: Questions by pool outcome, plus duplicates removed and select items per set size.
    stats: dict[str, Any] = field(default_factory=dict)


def seeded_rng(*parts: Any) -> random.Random:
    """A Random seeded from the parts' text, so the stream is the same in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


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


def self_cot_item(task: Any, example: Example, correct: Sequence[Sample]) -> TrainItem:
    return TrainItem("cot", example.id, task.cot_prompt(example), correct[-1].text.strip())


def self_refine_item(task: Any, example: Example, correct: Sequence[Sample], wrong: Sequence[Sample]) -> TrainItem:
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


def self_select_items(
    task: Any,
    example: Example,
    correct: Sequence[Sample],
    wrong: Sequence[Sample],
    config: BuildConfig,
    iteration: int,
    stats: Counter | None = None,
) -> list[TrainItem]:
    items = []
    for size in config.select_sizes:
        for rule, (chosen_correct, chosen_wrong) in enumerate(select_sets(correct, wrong, size)[: config.select_per_size]):
            candidates = [*chosen_correct, *chosen_wrong]
            # The position of the right answer must carry no signal: shuffle, seeded per set.
            seeded_rng(config.seed, example.id, iteration, "select", size, rule).shuffle(candidates)
            prompt = select_prompt(task, example, [c.text for c in candidates])
            if config.select_target == "answer":
                target = task.answer_line(example.answer, example)
            else:
                target = chosen_correct[0].text.strip()  # the newest correct candidate
            items.append(TrainItem("select", example.id, prompt, target))
            if stats is not None:
                stats[f"select_size_{size}"] += 1
    return items


def build_self_items(
    task: Any,
    examples: Sequence[Example],
    samples: Iterable[Sample],
    config: BuildConfig,
    iteration: int,
) -> BuildResult:
    """Self-CoT, self-refine and self-select items from a pool of all earlier iterations' samples.

    Questions whose samples are all correct give only self-CoT; all wrong give nothing.
    ``iteration`` is the iteration being trained; it seeds the shuffles.
    """
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
        correct = [s for s in group if s.correct]
        wrong = [s for s in group if not s.correct]
        if config.check_equations:
            checked = [s for s in correct if equations_hold(s.text)]
            stats["positives_failing_equations"] += len(correct) - len(checked)
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
    return BuildResult(items, count_kinds(items), dict(sorted(stats.items())))


def qa_items(task: Any, examples: Sequence[Example]) -> list[TrainItem]:
    """Direct-answer QA for every question: the QA prompt in, the bare answer out.

    A task may define ``qa_target(example)`` when its short answer is not ``str(example.answer)``.
    """
    target = getattr(task, "qa_target", None) or (lambda ex: str(ex.answer))
    return [TrainItem("qa", ex.id, task.qa_prompt(ex), str(target(ex))) for ex in examples]


def warmup_mixture(task: Any, examples: Sequence[Example], distill: Sequence[TrainItem]) -> list[TrainItem]:
    """Iteration 0's training data: QA for the whole train split plus the distilled CoT items."""
    return [*qa_items(task, examples), *distill]


def build_mixture(
    task: Any,
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

