"""Accuracy summaries over samples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from r3v.records import Sample


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
