"""Compute accounting and selection diagnostics against independent counts: the backend's own
token reports, and a scripted model whose picks are known."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from test_self_select_scripted import ScriptedSelectBackend, scripted  # noqa: F401 - a fixture

from r3v.bench import BenchConfig, evaluate_selection, run_bench
from r3v.records import Sampling


class TokenLedger:
    """The real tiny backend, with a ledger of what it reported per generate call: each request's
    prompt once (its completions share one prefill) and every completion's tokens."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[dict] = []

    def generate(self, requests, sampling):
        outputs = self.inner.generate(requests, sampling)
        self.calls.append({
            "greedy": sampling.greedy,
            "prompt": sum(completions[0].prompt_tokens for completions in outputs),
            "completion": sum(c.completion_tokens for completions in outputs for c in completions),
        })
        return outputs


def test_the_compute_figures_add_up_to_the_backends_own_token_counts(tmp_path, qwen_backend, clevr_task):
    ledger = TokenLedger(qwen_backend)
    examples = clevr_task.load("test", limit=5)
    config = BenchConfig(sampling=Sampling(n=3, max_new_tokens=6, seed=1), ladder=(1, 3),
                         selectors=("first", "majority", "self-select", "oracle"), select_max_new_tokens=5)
    identity = {"model": "tiny-qwen2-vl", "task": "clevr-synth", "split": "test"}
    results = run_bench(ledger, clevr_task, examples, config, tmp_path, identity)
    sampled = [call for call in ledger.calls if not call["greedy"]]
    selected = [call for call in ledger.calls if call["greedy"]]
    sample_tokens = sum(call["prompt"] + call["completion"] for call in sampled)
    select_tokens = sum(call["prompt"] + call["completion"] for call in selected)
    at_n = results["compute"]["3"]
    assert at_n["majority"]["tokens"] == at_n["oracle"]["tokens"] == sample_tokens
    assert at_n["self-select"]["tokens"] - at_n["majority"]["tokens"] == select_tokens_at(results, "3", ledger)
    assert at_n["self-select"]["select_calls"] == results["counts"]["self-select"]["model"] + \
        results["counts"]["self-select"]["fallback"] + results["counts"]["self-select"]["unparseable"]
    # first uses one candidate: the prompts plus the first completions only
    stored = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    firsts = [s for s in stored if s["sample_index"] == 0]
    assert at_n["first"]["tokens"] == sum(s["prompt_tokens"] + s["completion_tokens"] for s in firsts)
    assert at_n["first"]["tokens_per_question"] == pytest.approx(at_n["first"]["tokens"] / 5)
    # the select calls at k=1 and k=3 are all the greedy calls the backend served
    assert select_tokens_at(results, "1", ledger) + select_tokens_at(results, "3", ledger) == select_tokens
    # seconds: every sample carries its share of a measured call
    assert all(s["seconds"] > 0 for s in stored) and at_n["majority"]["seconds"] > 0
    # equal compute: majority at k=1 costs less than self-select at k=3, so it is the comparison
    point = next(p for p in results["equal_compute"]["self-select"] if p["k"] == 3)
    assert point["majority_k_at_this_budget"] == 3 and point["tokens_per_question"] >= at_n["majority"]["tokens_per_question"]


def select_tokens_at(results: dict, k: str, ledger: TokenLedger) -> int:
    return results["compute"][k]["self-select"]["tokens"] - results["compute"][k]["majority"]["tokens"]


def test_selection_diagnostics_follow_the_scripted_picks(clevr_task, request):
    examples, samples, rules = request.getfixturevalue("scripted")  # test_self_select_scripted's plan
    backend = ScriptedSelectBackend(rules)
    results = evaluate_selection(backend, clevr_task, examples, samples, ks=(3,),
                                 selector_names=["first", "majority", "self-select"], max_new_tokens=16)
    diagnostics = results["diagnostics"]["self-select"]

    # expected positions: the scripted pick's shown position, when its answer is unique among the three
    expected = Counter()
    for seen in backend.seen:
        rule = rules[seen.example_id]
        if rule[0] == "garbage":
            continue
        position = 3 if rule[0] == "last" else rule[1]
        picked = [s for s in samples if s.example_id == seen.example_id and s.text == seen.shown[position - 1]][0]
        same = [s for s in samples if s.example_id == seen.example_id and s.answer == picked.answer]
        if picked.answer is not None and len(same) == 1:
            expected[str(position)] += 1
    assert sum(expected.values()) > 3
    assert diagnostics["positions"] == {p: expected.get(p, 0) for p in ("1", "2", "3")}
    # first always picks position 1 when its answer is unique
    assert set(results["diagnostics"]["first"]["positions"]) == {"1", "2", "3"}
    assert results["diagnostics"]["first"]["positions"]["2"] == results["diagnostics"]["first"]["positions"]["3"] == 0

    items = results_items(backend, clevr_task, examples, samples)
    possible = [i for i in items if i["n_correct"] > 0]
    assert diagnostics["questions_with_a_right_candidate"] == len(possible)
    assert diagnostics["right_when_possible"] == pytest.approx(
        sum(i["selectors"]["self-select"]["correct"] for i in possible) / len(possible))
    none_right = [i for i in items if i["n_correct"] == 0]
    assert diagnostics["when_none_right"]["questions"] == len(none_right)
    agree = sum(i["selectors"]["self-select"]["answer"] == i["selectors"]["majority"]["answer"] for i in items)
    assert diagnostics["agreement_with_majority"] == pytest.approx(agree / len(items))
    assert results["diagnostics"]["majority"]["agreement_with_majority"] == 1.0


def results_items(backend, task, examples, samples) -> list[dict]:
    backend = ScriptedSelectBackend(backend.rules)
    return evaluate_selection(backend, task, examples, samples, ks=(3,), selector_names=["majority", "self-select"],
                              max_new_tokens=16, with_items=True)["items"]


def test_pool_diagnostics_count_checked_positives_negatives_and_one_sided_pools(clevr_task):
    from r3v.builders import build_self_items
    from r3v.config import BuildConfig
    from r3v.diagnostics import pool_summary
    from r3v.records import Sample

    examples = clevr_task.load("train", limit=3)

    def sample(ex, index, text):
        answer = clevr_task.extract(text, ex)
        return Sample(example_id=ex.id, sample_index=index, text=text, answer=answer,
                      correct=clevr_task.is_correct(answer, ex), model="m", sampling={}, seed=0, iteration=1)

    lucky = {}  # the right answer through a wrong count: right by luck
    pool = []
    for i, ex in enumerate(examples):
        good = clevr_task.teacher_rationale(ex)
        lucky[ex.id] = re.sub(r"There are (\d+)", lambda m: f"There are {int(m.group(1)) + 5}", good, count=1)
        wrong = f"There are 0 objects.\nAnswer: {int(ex.answer) + 1}"
        pattern = [[good, lucky[ex.id]], [good, wrong, wrong], [wrong]][i]  # all right / mixed / all wrong
        pool += [sample(ex, k, text) for k, text in enumerate(pattern)]
    assert [s.correct for s in pool] == [True, True, True, False, False, False]
    assert not clevr_task.check_steps(lucky[examples[0].id], examples[0])

    stats = build_self_items(clevr_task, examples, pool, BuildConfig(dedup=False), 2).stats
    summary = pool_summary(stats)
    assert (summary["all_right"], summary["mixed"], summary["all_wrong"]) == (1, 1, 1)
    assert summary["positives"] == 3 and summary["positives_steps_ok"] == pytest.approx(2 / 3)
    assert summary["negative_share_per_question"] == pytest.approx((0 + 2 / 3 + 1) / 3)
    assert pool_summary({}) is None  # iteration 0: no pool yet
