"""``r3v distill`` end to end against a real loopback chat server (tests/chat_server.py).

Two server modes: a scripted teacher that knows clevr-synth's answers (so yield, tries and the
keep-only-correct rule meet real numbers), and the tiny Qwen2-VL answering through the HF backend
(so the real generation path runs through HTTP).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from chat_server import ChatServer, Fault, ModelAnswerer, ScriptedAnswerer, word_count
from click.testing import CliRunner

from r3v.cli import main
from r3v.distill import ANSWER_HINT, DistillConfig, distill, work_dir
from r3v.io import iter_jsonl
from r3v.records import Sample
from r3v.store import manifest_path
from r3v.warmup import distill_items, read_warmup_file

LIMIT = 12
KEY = "sk-test-key"


class Teacher:
    """Knows each clevr-synth train question (by its text and image) and answers by a rule.

    ``correct_from(index)`` is the 1-based ask from which question ``index`` gets the right
    rationale (None: never); earlier asks get a rationale whose answer is off by one.
    """

    def __init__(self, task, correct_from):
        self.task = task
        self.correct_from = correct_from
        self.examples = {self.key(ex.question, ex.load_images()): ex for ex in task.load("train", limit=LIMIT)}
        self.asks: Counter = Counter()
        self.asked: list[str] = []  # example ids, in arrival order
        self.written: list[str] = []

    @staticmethod
    def key(question, images):
        return question, tuple(im.tobytes() for im in images)

    def __call__(self, call, n):
        example = self.examples[self.key(call.prompt.split("\n")[0], call.images)]
        index = int(example.id.split("-")[1])
        texts = []
        for _ in range(n):
            self.asks[example.id] += 1
            first = self.correct_from(index)
            if first is not None and self.asks[example.id] >= first:
                texts.append(self.task.teacher_rationale(example))
            else:
                wrong = int(example.answer) + 1
                texts.append(f"{example.metadata['rationale']}\n{self.task.answer_line(wrong, example)}")
        self.asked.append(example.id)
        self.written += texts
        return texts


def every_fourth(index):
    """Right on ask 1, 2 or 3 by index % 4; never for index % 4 == 3."""
    return {0: 1, 1: 2, 2: 3, 3: None}[index % 4]


def invoke(server, out, *args, env_key=KEY):
    result = CliRunner().invoke(
        main,
        ["distill", "--teacher", "gpt-4o", "--task", "clevr-synth", "--split", "train", "--limit", str(LIMIT),
         "--out", str(out), "--base-url", server.base_url, "--max-new-tokens", "64", "--chunk-size", "4",
         *args],
        env={"OPENAI_API_KEY": env_key},
    )  # fmt: skip
    return result


def lines(path):
    return [record for _, record in iter_jsonl(path)]


def test_keeps_only_correct_rationales_over_tries_and_reports_yield_tokens_cost(clevr_task, tmp_path):
    teacher = Teacher(clevr_task, every_fourth)
    out = tmp_path / "warmup.jsonl"
    with ChatServer(ScriptedAnswerer(teacher), api_key=KEY) as server:
        result = invoke(server, out, "--tries", "3", "--json", "--price-prompt", "2.5", "--price-completion", "10")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    indices = range(LIMIT)
    expected_kept = [i for i in indices if every_fourth(i) is not None]
    asked = [[i for i in indices if every_fourth(i) is None or every_fourth(i) > t] for t in range(3)]
    assert [t["asked"] for t in report["tries"]] == [len(a) for a in asked]
    assert [t["solved"] for t in report["tries"]] == [sum(every_fourth(i) == t + 1 for i in a) for t, a in
                                                      enumerate(asked)]  # fmt: skip
    assert (report["questions"], report["kept_questions"]) == (LIMIT, len(expected_kept))
    assert report["yield"] == len(expected_kept) / LIMIT
    assert len(server.calls) == sum(len(a) for a in asked)

    # The file: one line per kept question, in example order, the teacher's correct rationale.
    records = lines(out)
    examples = {ex.id: ex for ex in clevr_task.load("train", limit=LIMIT)}
    assert [r["example_id"] for r in records] == [f"train-{i}" for i in expected_kept]
    for record in records:
        example = examples[record["example_id"]]
        assert record["prompt"] == clevr_task.cot_prompt(example)
        assert record["target"] == clevr_task.teacher_rationale(example)
        assert (record["task"], record["teacher"]) == ("clevr-synth", "gpt-4o")

    # Tokens by the server's rule (words), cost from the prices per million.
    prompt_tokens = sum(word_count(c.prompt) for c in server.calls)
    completion_tokens = sum(word_count(t) for t in teacher.written)
    assert (report["prompt_tokens"], report["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert report["this_run"]["prompt_tokens"] == prompt_tokens
    assert report["this_run"]["requests"] == len(server.calls)
    assert report["cost_usd"] == pytest.approx((prompt_tokens * 2.5 + completion_tokens * 10) / 1e6)

    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["settings"]["teacher"] == "gpt-4o" and manifest["report"]["kept_questions"] == len(expected_kept)


def test_the_warmup_reader_loads_the_file(clevr_task, tmp_path):
    out = tmp_path / "warmup.jsonl"
    with ChatServer(ScriptedAnswerer(Teacher(clevr_task, every_fourth))) as server:
        assert invoke(server, out, "--tries", "2").exit_code == 0
    train = clevr_task.load("train", limit=LIMIT)
    by_id = {ex.id: ex for ex in train}
    items = read_warmup_file(out, by_id, task_name="clevr-synth")
    assert [item.example_id for item in items] == [r["example_id"] for r in lines(out)]
    assert all(item.kind == "distill" and item.objective == "sft" for item in items)
    assert all(item.target == clevr_task.teacher_rationale(by_id[item.example_id]) for item in items)
    assert distill_items(clevr_task, train, warmup_file=out) == items


def test_more_tries_on_a_rerun_asks_only_the_new_round(clevr_task, tmp_path):
    teacher = Teacher(clevr_task, every_fourth)
    out = tmp_path / "warmup.jsonl"
    with ChatServer(ScriptedAnswerer(teacher)) as server:
        assert invoke(server, out, "--tries", "2").exit_code == 0
    kept_after_two = [r["example_id"] for r in lines(out)]
    assert kept_after_two == [f"train-{i}" for i in range(LIMIT) if every_fourth(i) in (1, 2)]
    with ChatServer(ScriptedAnswerer(teacher)) as again:
        result = invoke(again, out, "--tries", "3", "--json")
    assert result.exit_code == 0, result.output
    # Rounds 1 and 2 come from their stores; round 3 asks the questions still unsolved.
    assert len(again.calls) == sum(1 for i in range(LIMIT) if every_fourth(i) in (3, None))
    assert [r["example_id"] for r in lines(out)] == [f"train-{i}" for i in range(LIMIT) if every_fourth(i)]
    assert json.loads(result.output)["this_run"]["requests"] == len(again.calls)


def test_interrupted_run_resumes_without_asking_twice(clevr_task, tmp_path):
    def rule(index):  # stateless, so the interrupted + resumed run must equal a clean one
        return None if index % 3 == 2 else 1

    out = tmp_path / "warmup.jsonl"
    teacher = Teacher(clevr_task, rule)
    # Call 6 is refused: chunk 1 of try 1 (calls 5-8) fails, chunk 0 (calls 1-4) is stored.
    faults = {6: Fault("status", 400, message="quota exceeded for this key")}
    with ChatServer(ScriptedAnswerer(teacher), faults=faults) as server:
        result = invoke(server, out, "--tries", "2", "--max-concurrency", "1")
    assert result.exit_code == 1
    assert "HTTP 400: quota exceeded for this key" in result.output and "Rerun" in result.output
    assert not out.exists()
    stored = [s["example_id"] for s in lines(work_dir(out) / "try1.jsonl")]
    assert stored == [f"train-{i}" for i in range(4)]

    resumed = Teacher(clevr_task, rule)
    with ChatServer(ScriptedAnswerer(resumed)) as server:
        assert invoke(server, out, "--tries", "2", "--max-concurrency", "1").exit_code == 0
    try1 = [s["example_id"] for s in lines(work_dir(out) / "try1.jsonl")]
    try2 = [s["example_id"] for s in lines(work_dir(out) / "try2.jsonl")]
    assert sorted(try1) == sorted(f"train-{i}" for i in range(LIMIT))
    assert try2 == [f"train-{i}" for i in range(LIMIT) if rule(i) is None]
    # The rerun asked exactly what was not stored: the rest of try 1, then all of try 2.
    assert Counter(resumed.asked) == Counter([i for i in try1 if i not in stored] + try2)

    clean_out = tmp_path / "clean" / "warmup.jsonl"
    with ChatServer(ScriptedAnswerer(Teacher(clevr_task, rule))) as server:
        assert invoke(server, clean_out, "--tries", "2").exit_code == 0
    assert out.read_text() == clean_out.read_text()


def test_answer_hint_goes_to_the_teacher_not_into_the_training_prompt(clevr_task, tmp_path):
    teacher = Teacher(clevr_task, lambda i: 1)
    config = DistillConfig(teacher="t", task="clevr-synth", limit=2, tries=1, answer_hint=True, max_new_tokens=32)
    from r3v.backends.openai import OpenAIBackend

    examples = clevr_task.load("train", limit=2)
    with ChatServer(ScriptedAnswerer(teacher)) as server:
        backend = OpenAIBackend(model="t", base_url=server.base_url)
        report = distill(backend, clevr_task, examples, config, tmp_path / "w.jsonl")
    hint = ANSWER_HINT.format(line="Answer: <answer>")
    assert sorted(c.prompt for c in server.calls) == sorted(clevr_task.cot_prompt(e) + "\n" + hint for e in examples)
    assert [r["prompt"] for r in lines(tmp_path / "w.jsonl")] == [clevr_task.cot_prompt(e) for e in examples]
    assert report.kept_questions == 2


def test_several_rationales_per_question_are_deduplicated(clevr_task, tmp_path):
    # n=3 per ask; each ask returns the correct rationale three times: only one distinct text exists.
    teacher = Teacher(clevr_task, lambda i: 1)
    examples = clevr_task.load("train", limit=3)
    config = DistillConfig(teacher="t", task="clevr-synth", limit=3, tries=2, n=3, keep_per_question=2)
    from r3v.backends.openai import OpenAIBackend

    with ChatServer(ScriptedAnswerer(teacher)) as server:
        report = distill(OpenAIBackend(model="t", base_url=server.base_url), clevr_task, examples, config,
                         tmp_path / "w.jsonl")  # fmt: skip
    # One distinct correct text per question, so keep_per_question=2 is never reached: both tries ask all.
    assert [t.asked for t in report.tries] == [3, 3]
    assert [t.solved for t in report.tries] == [0, 0]
    assert report.rationales == 3 and report.kept_questions == 3
    assert [c.n for c in server.calls] == [3] * 6


def test_tiny_model_teacher_through_http(qwen_backend, clevr_task, tmp_path):
    out = tmp_path / "warmup.jsonl"
    with ChatServer(ModelAnswerer(qwen_backend), api_key=KEY) as server:
        result = CliRunner().invoke(
            main,
            ["distill", "--teacher", "tiny-qwen2-vl", "--limit", "4", "--tries", "2", "--max-new-tokens", "8",
             "--out", str(out), "--base-url", server.base_url, "--json"],
            env={"OPENAI_API_KEY": KEY},
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    samples = [Sample.from_dict(s) for t in (1, 2) for s in lines(work_dir(out) / f"try{t}.jsonl")]
    # Every count in the report follows from the stored samples and the keep rule.
    keepable = {s.example_id for s in samples if s.correct and s.finish_reason == "stop" and s.text.strip()}
    assert report["kept_questions"] == len(keepable) == len(lines(out))
    assert report["tries"][0]["asked"] == 4
    assert len(server.calls) == sum(t["asked"] for t in report["tries"])
    assert report["completion_tokens"] == sum(s.completion_tokens for s in samples) == report["this_run"][
        "completion_tokens"
    ]  # fmt: skip
    assert all(1 <= s.completion_tokens <= 8 and s.prompt_tokens > 16 for s in samples)  # 16 image tokens
    assert report["prompt_tokens"] == report["this_run"]["prompt_tokens"]


def test_local_hf_teacher_without_http(tiny_qwen, tmp_path):
    out = tmp_path / "warmup.jsonl"
    result = CliRunner().invoke(
        main,
        ["distill", "--teacher", "tiny-qwen2-vl", "--backend", "hf", "--limit", "3", "--tries", "1",
         "--max-new-tokens", "6", "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["this_run"] is None and report["tries"][0]["samples"] == 3
    assert len(lines(work_dir(out) / "try1.jsonl")) == 3


def test_cli_errors_are_one_line(clevr_task, tmp_path):
    out = tmp_path / "w.jsonl"
    runner = CliRunner()
    result = runner.invoke(main, ["distill", "--teacher", "m", "--backend", "hf", "--base-url", "http://x/v1",
                                  "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "only --backend openai takes --base-url" in result.output
    result = runner.invoke(main, ["distill", "--teacher", "m", "--out", str(out), "--price-prompt", "1"])
    assert result.exit_code == 2 and "both --price-prompt and --price-completion" in result.output
    with ChatServer(ScriptedAnswerer(Teacher(clevr_task, every_fourth)), api_key=KEY) as server:
        result = invoke(server, out, env_key="sk-wrong")
        assert result.exit_code == 1 and "HTTP 401: Incorrect API key provided" in result.output
        assert invoke(server, out, "--tries", "1").exit_code == 0
        changed = invoke(server, out, "--tries", "1", "--temperature", "0.2")
    assert changed.exit_code == 1 and "written with other settings" in changed.output
