"""Metrics from one sample set: unbiased pass@k against brute force, ladders, breakdowns."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import pytest

from r3v import metrics
from r3v.records import Choice, Example, Sample


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            # the estimator is exact: the float is the correctly rounded subset share
            assert metrics.pass_at_k(n, c, k) == float(brute_force_pass_at_k(n, c, k)), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # With one correct sample, C(n-1, k) / C(n, k) = (n-k)/n, so pass@k = k/n exactly.
    assert metrics.pass_at_k(4000, 1, 1000) == 0.25
    assert metrics.pass_at_k(4000, 0, 2000) == 0.0
    assert metrics.pass_at_k(4000, 2001, 2000) == 1.0  # fewer wrong samples than k: always a correct one
    value = metrics.pass_at_k(4000, 3, 5)
    # 1 - prod_{i=n-c+1..n} (1 - k/i), the product form, agrees to float precision
    product = 1.0
    for i in range(4000 - 3 + 1, 4001):
        product *= 1 - 5 / i
    assert value == pytest.approx(1 - product, rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        metrics.pass_at_k(n, c, k)


def sample(example_id: str, index: int, correct: bool, answer: str | None = "1") -> Sample:
    return Sample(example_id=example_id, sample_index=index, text="", answer=answer, correct=correct,
                  model="m", sampling={}, seed=0)


def test_mean_pass_at_k_averages_questions():
    groups = [[sample("a", i, i == 0) for i in range(4)], [sample("b", i, False) for i in range(4)]]
    assert metrics.mean_pass_at_k(groups, 2) == (metrics.pass_at_k(4, 1, 2) + 0.0) / 2 == 0.25
    assert metrics.mean_pass_at_k([], 1) == 0.0


def test_group_by_example_orders_by_sample_index_and_summary_still_works():
    samples = [sample("b", 1, True), sample("a", 2, False), sample("a", 0, True), sample("b", 0, False),
               sample("a", 1, False)]
    groups = metrics.group_by_example(samples)
    assert [s.sample_index for s in groups["a"]] == [0, 1, 2]
    assert metrics.summarize_samples(samples) == {"examples": 2, "samples": 5, "accuracy": 2 / 5, "pass_at_n": 1.0}


def test_ladder_is_capped_at_n_and_always_reports_n():
    assert metrics.ladder_for(3) == [1, 3]
    assert metrics.ladder_for(4) == [1, 3, 4]
    assert metrics.ladder_for(10) == [1, 3, 5, 7, 10]
    assert metrics.ladder_for(1, [2, 5]) == [1]
    with pytest.raises(ValueError):
        metrics.ladder_for(0)


def test_parse_ladder():
    assert metrics.parse_ladder("7, 1,3,3") == [1, 3, 7]
    assert metrics.parse_ladder([5, 2]) == [2, 5]
    for bad in ("", "1,x", "0,2", "-1"):
        with pytest.raises(ValueError, match="ladder"):
            metrics.parse_ladder(bad)


def test_accuracy_counts_and_names():
    choices = [Choice("1", True), Choice(None, False, how="fallback"), Choice("2", False, how="skipped")]
    assert metrics.accuracy(choices) == 1 / 3 and metrics.accuracy([]) == 0.0
    assert metrics.how_counts(choices) == {"model": 0, "skipped": 1, "fallback": 1, "unparseable": 0, "rule": 1}
    assert [metrics.metric_name(s, 3) for s in ("first", "majority", "self-select", "oracle", "mine")] == [
        "first@3", "maj@3", "sel@3", "oracle@3", "mine@3"]


def test_breakdown_by_metadata_key():
    examples = [Example(id=str(i), task="t", question="q", answer="1", metadata={"kind": kind})
                for i, kind in enumerate(["add", "add", "sub"])]
    out = metrics.breakdown(examples, {"first": [Choice("1", True), Choice("2", False), Choice("1", True)]}, ["kind"])
    assert out == {"kind": {"add": {"examples": 2, "first": 0.5}, "sub": {"examples": 1, "first": 1.0}}}
