"""Self-select with a model that answers: a scripted backend reads the select prompt and picks.

The tiny test models never write a parseable choice, so on them self-select only ever falls back
to the majority vote. Here a deterministic backend stands in for a trained model: it parses the
numbered "Model's prediction k:" candidates out of the prompt it receives and answers by a rule
the test sets per question (the candidate at position p, the last candidate, or an unparseable
reply). The expected sel@N is then computed from what the backend saw and said, mapping each
picked position back to the stored sample by its text, and compared with what
``evaluate_selection`` (and ``run_bench``, sampling with the real tiny model) reports.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import permutations

import pytest
from volatile import without_seconds

from r3v.backends.base import Backend
from r3v.bench import BenchConfig, evaluate_selection, run_bench
from r3v.config import SelectConfig
from r3v.records import Completion, Request, Sample, Sampling

#: A select prompt: "<question + CoT instruction>\n\n" then "Model's prediction k:\n<text>" blocks
#: separated by blank lines, then "\n\n<select instruction>".
NUMBERED = re.compile(r"\n\nModel's prediction (\d+):\n")
TAG = re.compile(r"^Reasoning about (\S+), attempt \d+:")
ANSWER = re.compile(r"\nAnswer: (-?\d+)$")


@dataclass
class Seen:
    """One select request as the scripted backend read it."""

    example_id: str
    prompt: str
    shown: list[str]  # candidate texts in the order they are numbered
    reply: str
    images: int
    sampling: Sampling


def parse_candidates(prompt: str) -> list[str]:
    """The numbered candidate texts of a select prompt, in order (the texts hold no blank line)."""
    parts = NUMBERED.split(prompt)
    numbers = [int(n) for n in parts[1::2]]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    bodies = parts[2::2]
    bodies[-1] = bodies[-1].split("\n\n")[0]  # the select instruction follows the last one
    return bodies


@dataclass
class ScriptedSelectBackend:
    """A stand-in for a model that selects. ``rules`` maps an example id to ("pick", p),
    ("last",) or ("garbage",); the example is recognised by the tag its candidates carry."""

    rules: dict[str, tuple]
    model_id: str = "scripted-select"
    seen: list[Seen] = field(default_factory=list)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        out = []
        for request in requests:
            shown = parse_candidates(request.text)
            example_id = TAG.match(shown[0]).group(1)
            rule = self.rules[example_id]
            if rule[0] == "garbage":
                reply = "They all look plausible; I cannot decide."
            else:
                position = len(shown) if rule[0] == "last" else rule[1]
                found = ANSWER.search(shown[position - 1])
                reply = f"Prediction {position} is correct." + (f"\nAnswer: {found.group(1)}" if found else "")
            self.seen.append(Seen(example_id, request.text, shown, reply, len(request.images), sampling))
            out.append([Completion(reply, 0, 0, "stop")] * sampling.n)
        return out


def hand_sample(example, k: int, answer: str | None) -> Sample:
    body = "I cannot tell." if answer is None else f"there are some objects.\nAnswer: {answer}"
    return Sample(example_id=example.id, sample_index=k, text=f"Reasoning about {example.id}, attempt {k}: {body}",
                  answer=answer, correct=answer == example.answer, model="hand-made", sampling={}, seed=0)


#: Per question: candidate answers (g = gold, w / v = two wrong answers, None = no answer), the
#: backend's rule, and for questions the model does not decide, how and with what verdict.
PLAN = [
    (["g", "w", "v"], ("pick", 1), None),
    (["g", "w", "v"], ("pick", 2), None),
    (["g", "w", "v"], ("pick", 3), None),
    (["w", "g", "g"], ("last",), None),
    (["g", "w", "w"], ("last",), None),
    (["w", "w", "w"], ("garbage",), ("skipped", False)),  # all agree: no model call
    (["g", "g", "g"], ("garbage",), ("skipped", True)),
    (["w", "g", "g"], ("garbage",), ("fallback", True)),  # majority g
    (["g", "w", "w"], ("garbage",), ("fallback", False)),  # majority w
    ([None, "g", "v"], ("garbage",), ("fallback", True)),  # 1-1 tie: g was seen first
    (["g", "w", "v"], ("pick", 1), None),
    (["w", "v", "g"], ("pick", 1), None),
]


@pytest.fixture(scope="module")
def scripted(clevr_task):
    examples = clevr_task.load("test", limit=len(PLAN))
    samples, rules = [], {}
    for ex, (pattern, rule, _) in zip(examples, PLAN, strict=True):
        values = {"g": ex.answer, "w": str(int(ex.answer) + 1), "v": str(int(ex.answer) + 2), None: None}
        samples += [hand_sample(ex, k, values[p]) for k, p in enumerate(pattern)]
        rules[ex.id] = rule
    return examples, samples, rules


def run(clevr_task, examples, samples, rules, seed=0):
    backend = ScriptedSelectBackend(rules)
    assert isinstance(backend, Backend)
    results = evaluate_selection(backend, clevr_task, examples, samples, ks=(1, 3), selector_names=["self-select"],
                                 seed=seed, max_new_tokens=32, with_items=True)
    return results, backend


def test_sel_at_n_is_the_accuracy_of_the_backends_picks(clevr_task, scripted):
    examples, samples, rules = scripted
    results, backend = run(clevr_task, examples, samples, rules)
    stored = {(s.example_id, s.text): s for s in samples}
    at_n = {s.example_id: s for s in backend.seen if len(s.shown) == 3}
    items = {item["example_id"]: item["selectors"]["self-select"] for item in results["items"]}

    expected, mismapped = [], 0
    for ex, (_, rule, decided) in zip(examples, PLAN, strict=True):
        item = items[ex.id]
        if decided is not None and decided[0] == "skipped":
            assert ex.id not in at_n  # nothing to choose: the model is not asked
            assert (item["how"], item["correct"]) == decided
            expected.append(decided[1])
            continue
        seen = at_n[ex.id]
        assert item["raw_output"] == seen.reply
        if decided is not None:  # unparseable reply: the majority vote decides
            assert (item["how"], item["correct"]) == decided
            expected.append(decided[1])
            continue
        # The backend's pick, mapped from its shuffled position back to the stored sample.
        position = 3 if rule[0] == "last" else rule[1]
        picked = stored[(ex.id, seen.shown[position - 1])]
        assert (item["how"], item["answer"], item["correct"]) == ("model", picked.answer, picked.correct), ex.id
        expected.append(picked.correct)
        unshuffled = next(s for s in samples if s.example_id == ex.id and s.sample_index == position - 1)
        mismapped += unshuffled.correct != picked.correct

    assert results["ladder"]["3"]["sel@3"] == results["accuracy"]["self-select"] == sum(expected) / len(PLAN)
    # Not vacuous: the picks are sometimes right and sometimes wrong, and reading the position in
    # the stored (unshuffled) order would change at least one verdict.
    assert 0 < sum(expected[i] for i, plan in enumerate(PLAN) if plan[2] is None) < 7
    assert mismapped > 0

    # Exactly the scripted fallbacks and skips; at k=1 only the question whose first sample has no
    # answer reaches the model, and its unparseable reply falls back to a vote with no votes.
    assert results["counts"]["self-select"] == {"model": 7, "skipped": 2, "fallback": 3, "unparseable": 0, "rule": 0}
    assert results["counts_by_k"]["1"]["self-select"] == {"model": 0, "skipped": 11, "fallback": 1, "unparseable": 0, "rule": 0}
    assert (results["skipped"], results["fallback"]) == (2, 3)
    assert results["ladder"]["1"]["sel@1"] == sum(s.correct for s in samples if s.sample_index == 0) / len(PLAN)

    # What the backend was sent: one greedy request per undecided question, with its image.
    assert Counter(len(s.shown) for s in backend.seen) == {3: 10, 1: 1}
    for seen in backend.seen:
        ex = next(e for e in examples if e.id == seen.example_id)
        assert seen.sampling.greedy and seen.sampling.max_new_tokens == 32
        assert seen.images == 1 and seen.prompt.startswith(ex.question + "\n")
        assert seen.prompt.endswith("\n\n" + clevr_task.select_instruction(ex))


def shown_orders(backend, samples) -> dict[str, tuple[int, ...]]:
    """Per question, the stored sample indices in the order the prompt numbered them."""
    index = {(s.example_id, s.text): s.sample_index for s in samples}
    return {seen.example_id: tuple(index[(seen.example_id, text)] for text in seen.shown)
            for seen in backend.seen if len(seen.shown) == 3}


def test_candidates_are_shuffled_per_question_with_a_seed(clevr_task, scripted):
    examples, samples, rules = scripted
    first_results, first = run(clevr_task, examples, samples, rules, seed=0)
    again_results, again = run(clevr_task, examples, samples, rules, seed=0)
    other_results, other = run(clevr_task, examples, samples, rules, seed=1)
    orders = shown_orders(first, samples)
    assert all(sorted(order) == [0, 1, 2] for order in orders.values())  # each sample shown once
    assert shown_orders(again, samples) == orders  # same on rerun
    assert without_seconds(again_results) == without_seconds(first_results)
    assert len(set(orders.values())) > 1  # different across questions
    assert orders != {k: (0, 1, 2) for k in orders}  # and not the stored order
    assert shown_orders(other, samples) != orders  # another seed, another shuffle


class SampleThenScript:
    """The real tiny model samples the candidates; the select call (greedy) goes to a script that
    recognises each question by its image and replies as told."""

    def __init__(self, sampler, replies_by_image: dict[bytes, str]) -> None:
        self.sampler = sampler
        self.model_id = sampler.model_id
        self.replies_by_image = replies_by_image
        self.select_prompts: dict[bytes, str] = {}

    def generate(self, requests, sampling):
        if not sampling.greedy:
            return self.sampler.generate(requests, sampling)
        out = []
        for request in requests:
            key = request.images[0].tobytes()
            self.select_prompts[key] = request.text
            out.append([Completion(self.replies_by_image[key], 0, 0, "stop")])
        return out


def test_run_bench_end_to_end_scores_the_scripted_choices(clevr_task, qwen_backend, tmp_path):
    examples = clevr_task.load("test", limit=4)
    keys = [ex.load_images()[0].tobytes() for ex in examples]
    assert len(set(keys)) == 4  # each question is recognisable by its image
    replies = [f"Answer: {examples[0].answer}", f"Answer: {int(examples[1].answer) + 1}", "No idea.",
               f"The second one.\nAnswer: {examples[3].answer}"]
    backend = SampleThenScript(qwen_backend, dict(zip(keys, replies, strict=True)))
    config = BenchConfig(sampling=Sampling(n=3, max_new_tokens=6, seed=4), ladder=(3,),
                         selectors=("first", "self-select"), select_max_new_tokens=16)
    identity = {"model": "tiny-qwen2-vl", "adapter": None, "backend": "hf", "task": "clevr-synth",
                "split": "test", "limit": 4, "data_dir": None}
    results = run_bench(backend, clevr_task, examples, config, tmp_path, identity)

    stored = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    items = {json.loads(line)["example_id"]: json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()}
    expected, how = [], Counter()
    for ex, key, reply in zip(examples, keys, replies, strict=True):
        group = sorted((s for s in stored if s["example_id"] == ex.id), key=lambda s: s["sample_index"])
        answers = [s["answer"] for s in group]
        choice = items[ex.id]["selectors"]["self-select"]
        if None not in answers and len({a.strip() for a in answers}) == 1:
            how["skipped"] += 1
            expected.append(group[0]["correct"])
            assert key not in backend.select_prompts
            continue
        # The select prompt lists the three stored samples, in some order.
        prompt = backend.select_prompts[key]
        head = clevr_task.cot_prompt(ex) + "\n\n"
        tail = "\n\n" + clevr_task.select_instruction(ex)
        listings = {head + "\n\n".join(f"Model's prediction {i}:\n{s['text'].strip()}" for i, s in enumerate(order, 1)) + tail
                    for order in permutations(group)}
        assert prompt in listings
        assert choice["raw_output"] == reply
        parsed = re.search(r"Answer: (-?\d+)", reply)
        if parsed:
            how["model"] += 1
            expected.append(parsed.group(1) == ex.answer)
        else:  # majority over the stored answers, ties to the first seen, abstentions ignored
            how["fallback"] += 1
            votes = Counter(a.strip() for a in answers if a is not None)
            if votes:
                best = max(votes.values())
                winner = next(a for a in answers if a is not None and votes[a.strip()] == best)
                expected.append(winner.strip() == ex.answer)
            else:
                expected.append(False)
    assert results["accuracy"]["self-select"] == results["ladder"]["3"]["sel@3"] == sum(expected) / 4
    assert results["counts"]["self-select"] == {"model": how["model"], "skipped": how["skipped"],
                                                "fallback": how["fallback"], "unparseable": 0, "rule": 0}
    # Not vacuous: the untrained tiny model's candidates carry no agreed answer, so the script's
    # replies decide (with seed 4: all four questions reach it, three with a parseable answer).
    assert how["model"] >= 1 and how["fallback"] + how["model"] + how["skipped"] == 4
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == results["accuracy"]


def test_the_reference_rules_always_ask_the_model_and_score_unreadable_replies_wrong(clevr_task, scripted):
    # --reference's selection: no skip when the candidates agree, and an unparseable reply is
    # wrong instead of falling back to the vote. Expected verdicts come from the plan alone.
    examples, samples, rules = scripted
    backend = ScriptedSelectBackend(rules)
    results = evaluate_selection(backend, clevr_task, examples, samples, ks=(3,), selector_names=["self-select"],
                                 seed=0, max_new_tokens=32, with_items=True,
                                 select=SelectConfig(skip_when_agree=False, unparseable="wrong"))
    asked = {seen.example_id for seen in backend.seen}
    assert asked == {ex.id for ex in examples}  # every question reaches the model, agreeing ones too
    items = {item["example_id"]: item["selectors"]["self-select"] for item in results["items"]}
    garbage = [ex for ex, (_, rule, _) in zip(examples, PLAN, strict=True) if rule[0] == "garbage"]
    for ex in garbage:
        assert (items[ex.id]["how"], items[ex.id]["answer"], items[ex.id]["correct"]) == ("unparseable", None, False)
    assert results["counts"]["self-select"] == {"model": len(PLAN) - len(garbage), "skipped": 0, "fallback": 0,
                                                "unparseable": len(garbage), "rule": 0}
    assert results["select"] == {"skip_when_agree": False, "unparseable": "wrong"}
    # The default rules credit the agreeing-gold skip and the two fallbacks whose vote is gold
    # (one by a tie); the reference rules credit none of them, and the model's own picks are unchanged.
    default, _ = run(clevr_task, examples, samples, rules)
    credited_by_shortcuts = sum(1 for _, rule, decided in PLAN if rule[0] == "garbage" and decided[1])
    assert credited_by_shortcuts == 3
    assert results["accuracy"]["self-select"] == pytest.approx(default["accuracy"]["self-select"] - 3 / len(PLAN))
