"""Accuracy summaries over samples and selections, all computed from one fixed sample set.

Nothing here samples again. With N stored samples per question:

- ``pass@k`` is the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` with
  ``c`` of ``n`` samples correct: the chance that k samples drawn without replacement from the n
  contain a correct one, averaged over questions.
- Selector metrics at k (``first@k``, ``maj@k``, ``sel@k``, ``oracle@k``) apply the selector to the
  first k samples of each question, a fixed prefix in sample-index order. They are one draw, not
  an average over k-subsets, so they are noisier than pass@k; at k = N every metric sees all samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from math import comb
from typing import Any

from r3v.records import Choice, Example, Sample
from r3v.selectors.base import METRIC_PREFIX

DEFAULT_LADDER = (1, 3, 5, 7)



def group_by_example(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.example_id].append(sample)
    for group in groups.values():
        group.sort(key=lambda s: s.sample_index)
    return dict(groups)


def summarize_samples(samples: Sequence[Sample]) -> dict[str, float]:
    """Per-sample accuracy and pass@n (any sample correct) over the examples present."""
    groups = group_by_example(samples)
    n_examples = len(groups)
    return {
        "examples": n_examples,
        "samples": len(samples),
        "accuracy": sum(s.correct for s in samples) / len(samples) if samples else 0.0,
        "pass_at_n": sum(any(s.correct for s in g) for g in groups.values()) / n_examples if n_examples else 0.0,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question with ``c`` of ``n`` samples correct.

    Binomials are exact Python integers and the final division is correctly rounded, so there is
    no overflow or cancellation even for large n (the float product form loses digits near 1).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    total = comb(n, k)
    return (total - comb(n - c, k)) / total


def mean_pass_at_k(groups: Iterable[Sequence[Sample]], k: int) -> float:
    """pass@k averaged over questions, each using all of its samples."""
    values = [pass_at_k(len(g), sum(s.correct for s in g), k) for g in groups]
    return sum(values) / len(values) if values else 0.0


def accuracy(choices: Sequence[Choice]) -> float:
    """Fraction of choices that are correct (0.0 for none)."""
    return sum(c.correct for c in choices) / len(choices) if choices else 0.0


def how_counts(choices: Iterable[Choice]) -> dict[str, int]:
    """How many selections the model made, skipped (candidates agreed), fell back, left unparseable
    (scored wrong), or made by rule."""
    counts = {"model": 0, "skipped": 0, "fallback": 0, "unparseable": 0, "rule": 0}
    for choice in choices:
        counts[choice.how] = counts.get(choice.how, 0) + 1
    return counts


def metric_name(selector: str, k: int) -> str:
    return f"{METRIC_PREFIX.get(selector, selector)}@{k}"


def parse_ladder(text: str | Sequence[int]) -> list[int]:
    """``"1,3,5,7"`` (or a list of ints) as sorted distinct positive ks."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError as exc:
            raise ValueError(f"the k ladder must be comma-separated integers like 1,3,5,7, got {text!r}") from exc
    else:
        values = [int(v) for v in text]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"the k ladder needs positive integers, got {text!r}")
    return sorted(set(values))


def ladder_for(n: int, ladder: Sequence[int] = DEFAULT_LADDER) -> list[int]:
    """The ks to report for N samples: the ladder capped at N, always ending with N itself."""
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}")
    return sorted({k for k in ladder if k <= n} | {n})


def breakdown(
    examples: Sequence[Example], choices_by_selector: dict[str, Sequence[Choice]], keys: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Accuracy per selector within each value of each ``Example.metadata`` key (the task's breakdown)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in keys:
        positions: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(examples):
            if key in example.metadata:
                positions[str(example.metadata[key])].append(i)
        out[key] = {
            value: {
                "examples": len(where),
                **{name: accuracy([choices[i] for i in where]) for name, choices in choices_by_selector.items()},
            }
            for value, where in sorted(positions.items())
        }
    return out
