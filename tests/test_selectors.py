"""Selectors on hand-built candidates (to force ties, agreement, disagreement) and the real tiny model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from r3v.metrics import how_counts
from r3v.records import Sample
from r3v.registry import selectors
from r3v.selectors.first import FirstSelector
from r3v.selectors.majority import MajoritySelector, majority_vote
from r3v.selectors.oracle import OracleSelector
from r3v.selectors.self_select import SelfSelectSelector


def candidates(example, answers: list[str | None]) -> list[Sample]:
    """Samples for ``example`` with the given extracted answers, scored against its gold answer."""
    return [
        Sample(
            example_id=example.id,
            sample_index=i,
            text=f"There are some objects.\nAnswer: {a}" if a is not None else "I cannot tell.",
            answer=a,
            correct=a is not None and a.strip() == str(example.answer),
            model="hand-made",
            sampling={},
            seed=0,
        )
        for i, a in enumerate(answers)
    ]


@pytest.fixture(scope="module")
def examples(clevr_task):
    return clevr_task.load("test", limit=5)


@pytest.fixture(scope="module")
def example(examples):
    return examples[0]


def other(example, offset: int = 1) -> str:
    return str(int(example.answer) + offset)


def test_all_four_are_registered_with_a_docstring():
    for name in ("first", "majority", "self-select", "oracle"):
        factory = selectors.get(name)
        assert factory.name == name
        assert factory.__doc__.strip().splitlines()[0]


def test_first_takes_the_first_candidate(clevr_task, example):
    cands = candidates(example, [other(example), example.answer, example.answer])
    choice = FirstSelector().select(clevr_task, example, cands)
    assert (choice.answer, choice.correct, choice.how) == (other(example), False, "rule")


def test_majority_votes_on_normalised_answers_not_raw_text(clevr_task, example):
    gold, wrong = example.answer, other(example)
    # Raw strings "7 " and "7" differ, but clevr-synth normalises both to "7", so the gold answer
    # wins 2 votes to 1. Voting on raw text would tie 1-1-1 and pick the wrong answer, seen first.
    cands = candidates(example, [wrong, f"{gold} ", gold])
    choice = MajoritySelector().select(clevr_task, example, cands)
    assert choice.answer == f"{gold} " and choice.correct


@pytest.mark.parametrize(
    "pattern, winner",
    [
        (["a", "b", "b", "a"], "a"),  # 2-2 tie: "a" was seen first
        (["b", "a", "a", "b"], "b"),
        (["a", "b", "c"], "a"),  # 1-1-1 tie
        ([None, "b", "a", "a", "b"], "b"),  # abstentions do not count as "seen"
        (["a", "b", "b"], "b"),  # a strict majority beats an earlier answer
    ],
)
def test_majority_tie_goes_to_the_answer_seen_first(clevr_task, example, pattern, winner):
    values = {"a": other(example, 1), "b": other(example, 2), "c": other(example, 3)}
    cands = candidates(example, [values[p] if p else None for p in pattern])
    assert MajoritySelector().select(clevr_task, example, cands).answer == values[winner]


def test_majority_without_votes_answers_none(clevr_task, example):
    choice = MajoritySelector().select(clevr_task, example, candidates(example, [None, None]))
    assert choice.answer is None and not choice.correct
    assert MajoritySelector().select(clevr_task, example, candidates(example, [None, "3", None])).answer == "3"


@given(st.lists(st.sampled_from(["1", "2", "3", " 2", None]), min_size=1, max_size=9))
def test_majority_matches_the_rule_on_any_candidate_list(clevr_task, example, answers):
    cands = candidates(example, answers)
    winner = majority_vote(clevr_task, example, cands)
    keys = [a.strip() for a in answers if a is not None]
    if not keys:
        assert winner is None
        return
    best = max(keys.count(k) for k in set(keys))
    earliest_of_best = next(k for k in keys if keys.count(k) == best)
    assert winner.answer.strip() == earliest_of_best
    assert winner is next(c for c in cands if c.answer is not None and c.answer.strip() == earliest_of_best)


def test_oracle_is_right_when_any_candidate_is(clevr_task, example):
    wrong = other(example)
    choice = OracleSelector().select(clevr_task, example, candidates(example, [wrong, None, example.answer]))
    assert choice.correct and choice.answer == example.answer
    choice = OracleSelector().select(clevr_task, example, candidates(example, [wrong, None]))
    assert not choice.correct and choice.answer == wrong


def test_self_select_skips_the_model_when_all_candidates_agree(clevr_task, example):
    selector = SelfSelectSelector()
    cands = candidates(example, [other(example), f"{other(example)} ", other(example)])
    # No backend at all: a model call would raise, so success proves it was skipped.
    choice = selector.select(clevr_task, example, cands, backend=None)
    assert (choice.answer, choice.correct, choice.how, choice.raw_output) == (other(example), False, "skipped", None)
    assert selector.counts == {"model": 0, "skipped": 1, "fallback": 0, "unparseable": 0}


def test_self_select_does_not_skip_when_a_candidate_has_no_answer(clevr_task, example):
    cands = candidates(example, [example.answer, None, example.answer])
    with pytest.raises(ValueError, match="needs a backend"):
        SelfSelectSelector().select(clevr_task, example, cands, backend=None)


def test_untrained_model_output_falls_back_to_majority(clevr_task, examples, qwen_backend):
    # Disagreeing candidates force a model call; the untrained tiny model writes no parseable
    # answer, so every choice must be the majority vote, counted as a fallback.
    selector = SelfSelectSelector(max_new_tokens=8)
    by_id = {ex.id: candidates(ex, [other(ex), ex.answer, ex.answer]) for ex in examples}
    choices = selector.select_many(clevr_task, examples, by_id, qwen_backend)
    assert len(choices) == len(examples)
    for ex, choice in zip(examples, choices, strict=True):
        assert choice.raw_output is not None
        assert clevr_task.extract(choice.raw_output, ex) is None
        assert (choice.how, choice.answer, choice.correct) == ("fallback", ex.answer, True)
    assert selector.counts == {"model": 0, "skipped": 0, "fallback": len(examples), "unparseable": 0}
    assert how_counts(choices)["fallback"] == len(examples)


def test_skip_can_be_turned_off(clevr_task, example, qwen_backend):
    selector = SelfSelectSelector(skip_when_agree=False, max_new_tokens=6)
    choice = selector.select(clevr_task, example, candidates(example, [example.answer] * 3), qwen_backend)
    assert choice.how in {"model", "fallback"} and choice.raw_output is not None
    assert selector.counts["skipped"] == 0


def test_a_parseable_select_output_is_the_models_choice(clevr_task, example):
    selector = SelfSelectSelector()
    cands = candidates(example, [other(example), example.answer, other(example)])
    choice = selector.judge(clevr_task, example, cands, f"Prediction 2 is right.\nAnswer: {example.answer}")
    assert (choice.answer, choice.correct, choice.how) == (example.answer, True, "model")
    # The model may also name an answer no candidate gave; it is scored like any answer.
    choice = selector.judge(clevr_task, example, cands, f"Answer: {other(example, 5)}")
    assert (choice.answer, choice.correct, choice.how) == (other(example, 5), False, "model")


def test_fallback_with_no_votes_answers_none(clevr_task, example):
    choice = SelfSelectSelector().judge(clevr_task, example, candidates(example, [None, None]), "no idea")
    assert (choice.answer, choice.correct, choice.how) == (None, False, "fallback")


def test_candidate_order_is_seeded_per_example_and_stable(clevr_task, examples):
    orders = []
    for ex in examples:
        cands = candidates(ex, ["1", "2", "3", "4"])
        first = [c.sample_index for c in SelfSelectSelector(seed=3).shuffled(ex, cands)]
        again = [c.sample_index for c in SelfSelectSelector(seed=3).shuffled(ex, cands)]
        assert first == again and sorted(first) == [0, 1, 2, 3]
        orders.append(first)
        prompt = SelfSelectSelector(seed=3).prompt(clevr_task, ex, cands)
        positions = [prompt.index(f"Answer: {c.answer}") for c in SelfSelectSelector(seed=3).shuffled(ex, cands)]
        assert positions == sorted(positions)  # the prompt lists candidates in the shuffled order
        assert "Model's prediction 4:" in prompt and clevr_task.select_instruction(ex) in prompt
    # Different examples get different orders, so "the first one" carries no signal.
    assert len({tuple(o) for o in orders}) > 1
    other_seed = [[c.sample_index for c in SelfSelectSelector(seed=4).shuffled(ex, candidates(ex, ["1", "2", "3", "4"]))]
                  for ex in examples]
    assert other_seed != orders


class CountingBackend:
    """Passes every call to the real backend, counting generate calls and requests."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[int] = []

    def generate(self, requests, sampling):
        self.calls.append(len(requests))
        return self.inner.generate(requests, sampling)


def test_select_many_sends_one_generate_call_and_matches_one_by_one(clevr_task, examples, qwen_backend):
    by_id = {ex.id: candidates(ex, [other(ex), ex.answer, None]) for ex in examples}
    # make two questions agree, so they are skipped and left out of the batch
    for ex in examples[:2]:
        by_id[ex.id] = candidates(ex, [ex.answer, ex.answer])
    counting = CountingBackend(qwen_backend)
    batched = SelfSelectSelector(max_new_tokens=6).select_many(clevr_task, examples, by_id, counting)
    assert counting.calls == [len(examples) - 2]
    one_by_one = [SelfSelectSelector(max_new_tokens=6).select(clevr_task, ex, by_id[ex.id], qwen_backend)
                  for ex in examples]
    assert batched == one_by_one  # greedy decoding does not depend on the batch
    assert [c.how for c in batched[:2]] == ["skipped", "skipped"]
