"""Three iterations of the loop with a pool whose content is known, and the items written out by hand.

A scripted backend stands in for the sampling model (the trainer still trains the tiny model for
real, every iteration). It writes texts that name the model that drew them, ``m{j}`` for
iteration j's model, and the sample index, and it is right or wrong by a fixed rule:

    question A (train-0): sample 1 wrong, samples 0 and 2 right, for every model;
    question B (train-1): model 0 always wrong; model 1 right only at sample 2;
                          model 2 right only at sample 0.

So the pool of iteration k holds the samples of iterations 1..k (drawn by models 0..k-1), and the
items each iteration must build follow from the rules above, by hand: a pool that read only the
last iteration, or ordered "newest" by sample index before iteration, builds other items.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from r3v.cli import main
from r3v.records import Completion, Request, Sampling, TrainItem, read_jsonl
from r3v.registry import backends
from r3v.tasks.clevr_synth import ClevrSynth

TASK = ClevrSynth()
TRAIN = TASK.load("train", limit=2)
GOLD = {ex.id: int(ex.answer) for ex in TRAIN}
NAME = "scripted-iterations"


def model_number(model: str, adapter: str | None) -> int:
    """Which iteration's model a backend was built for: iter{k}/model -> k, the base -> 0... of the
    models trained, iteration k's model is 'm{k}' (the warm-up, iteration 0, is 'm0')."""
    found = re.search(r"iter(\d+)/model", f"{model} {adapter}")
    return int(found.group(1)) if found else -1  # the base model itself: never sampled from here


def right(question: str, model: int, sample: int) -> bool:
    if question == "train-0":
        return sample != 1
    return {0: False, 1: sample == 2, 2: sample == 0}.get(model, False)


def text(question: str, model: int, sample: int) -> str:
    answer = GOLD[question] if right(question, model, sample) else GOLD[question] + 1
    return f"m{model} sample {sample} counted the objects.\nAnswer: {answer}"


class ScriptedBackend:
    """Answers by the rules above; a test question gets a fixed (wrong) answer."""

    def __init__(self, model: str, adapter: str | None = None, trust_remote_code: bool = False) -> None:
        self.model = model_number(model, adapter)
        self.model_id = f"m{self.model}"

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        prompts = {TASK.cot_prompt(ex): ex.id for ex in TRAIN}
        out = []
        for request in requests:
            question = prompts.get(request.text)
            texts = [text(question, self.model, k) if question else "Answer: -1" for k in range(sampling.n)]
            out.append([Completion(t, 10, 8, "stop") for t in texts])
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    backends._entries[NAME] = ScriptedBackend
    try:
        done = {}
        for mode in ("--from-base", "--continue"):
            out = tmp_path_factory.mktemp("iterations") / mode.strip("-")
            result = CliRunner().invoke(main, [
                "train", "--iterations", "3", "--model", "tiny-qwen2-vl", "--task", "clevr-synth", "--backend", NAME,
                "--train-limit", "2",
                "--test-limit", "1", "--eval-samples", "0", "--teacher-count", "0", "--epochs", "1",
                "--training-process", "inline", "--seed", "3", mode, "--out", str(out),
                # no distilled CoT would start from the base model; this test follows trained models
                "warmup.skip_training=false",
            ], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            done[mode] = out
        return done
    finally:
        del backends._entries[NAME]


def self_items(out: Path, k: int) -> list[TrainItem]:
    return [TrainItem.from_dict(r) for r in read_jsonl(out / f"iter{k}" / "train_items.jsonl")
            if r["kind"] in ("cot", "refine", "select")]


def candidates(prompt: str) -> set[str]:
    """The (model, sample) pairs a select prompt offers."""
    return set(re.findall(r"Model's prediction \d+:\nm(\d) sample (\d)", prompt))


def wrong_in(prompt: str) -> tuple[str, str]:
    (pair,) = re.findall(r"Model's prediction:\nm(\d) sample (\d)", prompt)
    return pair


def summary(items: list[TrainItem]) -> list[tuple]:
    """Each item as (kind, question, what it shows): the target's (model, sample) for cot; the
    wrong input and the target for refine; the offered candidates and the target for select."""
    rows = []
    for item in items:
        target = re.match(r"m(\d) sample (\d)", item.target)
        target = target.groups() if target else item.target
        if item.kind == "cot":
            rows.append(("cot", item.example_id, target))
        elif item.kind == "refine":
            rows.append(("refine", item.example_id, wrong_in(item.prompt), target))
        else:
            rows.append(("select", item.example_id, frozenset(candidates(item.prompt)), target))
    return sorted(rows, key=row_key)


def row_key(row: tuple) -> str:
    """A sort key that is the same for equal rows: a frozenset's repr follows its iteration order,
    which can differ between equal sets (string hashes are salted per process)."""
    return repr(tuple(sorted(part) if isinstance(part, frozenset) else part for part in row))


A, B = "train-0", "train-1"
ANSWER_A, ANSWER_B = f"Answer: {GOLD[A]}", f"Answer: {GOLD[B]}"

# Written out by hand from the rules in the module docstring. (model, sample) pairs as strings.
EXPECTED = {
    1: [  # pool: model 0 only. A: right 0, 2; wrong 1. B: all wrong -> nothing.
        ("cot", A, ("0", "2")),
        ("refine", A, ("0", "1"), ("0", "2")),
        # 2 right + 1 wrong; the leaning-wrong set would need 2 wrong: the same composition, once
        ("select", A, frozenset({("0", "2"), ("0", "0"), ("0", "1")}), ANSWER_A),
    ],
    2: [  # pool: models 0 and 1.
        ("cot", A, ("1", "2")),
        ("refine", A, ("1", "1"), ("1", "2")),
        ("select", A, frozenset({("1", "2"), ("1", "0"), ("1", "1")}), ANSWER_A),
        ("select", A, frozenset({("1", "1"), ("0", "1"), ("1", "2")}), ANSWER_A),  # 2 newest wrong span models
        ("cot", B, ("1", "2")),
        ("refine", B, ("1", "1"), ("1", "2")),
        ("select", B, frozenset({("1", "2"), ("1", "1"), ("1", "0")}), ANSWER_B),
    ],
    3: [  # pool: models 0, 1 and 2. B's newest right sample is m2's sample 0, not m1's sample 2.
        ("cot", A, ("2", "2")),
        ("refine", A, ("2", "1"), ("2", "2")),
        ("select", A, frozenset({("2", "2"), ("2", "0"), ("2", "1")}), ANSWER_A),
        ("select", A, frozenset({("2", "1"), ("1", "1"), ("2", "2")}), ANSWER_A),
        ("cot", B, ("2", "0")),
        ("refine", B, ("2", "2"), ("2", "0")),
        ("select", B, frozenset({("2", "0"), ("1", "2"), ("2", "2")}), ANSWER_B),  # needs iteration 2's pool
        ("select", B, frozenset({("2", "2"), ("2", "1"), ("2", "0")}), ANSWER_B),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--from-base", "--continue"])
def test_each_iteration_builds_its_items_from_the_samples_of_all_earlier_ones(runs, mode):
    out = runs[mode]
    for k in (1, 2, 3):
        drawn = read_jsonl(out / f"iter{k}" / "samples.jsonl")
        assert {(s["example_id"], s["text"].split(" ")[0], s["iteration"]) for s in drawn} == {
            (q, f"m{k - 1}", k) for q in (A, B)}  # iteration k's samples come from model k-1
        assert summary(self_items(out, k)) == sorted(EXPECTED[k], key=row_key), k
        warmup = [r for r in read_jsonl(out / f"iter{k}" / "train_items.jsonl") if r["kind"] == "qa"]
        assert sorted(r["example_id"] for r in warmup) == [A, B]  # the warm-up joins every mixture
        pool = read_jsonl(out / "metrics.jsonl")[k]["pool_samples"]
        assert pool == 6 * k  # 2 questions x 3 samples per iteration so far


@pytest.mark.slow
def test_each_iteration_starts_from_the_base_or_from_the_previous_model(runs):
    for k in (0, 1, 2, 3):
        job = yaml.safe_load((runs["--from-base"] / f"iter{k}" / "train_job.yaml").read_text())
        assert (job["model"], job["init_adapter"]) == ("tiny-qwen2-vl", None)
        job = yaml.safe_load((runs["--continue"] / f"iter{k}" / "train_job.yaml").read_text())
        start = "tiny-qwen2-vl" if k == 0 else f"../iter{k - 1}/model/model"
        assert (job["model"], job["init_adapter"]) == (start, None)  # the tiny preset trains fully
        if k:
            assert (runs["--continue"] / f"iter{k}" / job["model"] / "model.safetensors").exists()
