"""``r3v score``: generic scoring of saved model outputs, its JSON, verdict file and bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from r3v.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def run(*args: str):
    return CliRunner().invoke(main, ["score", *args], catch_exceptions=False)


def expected(task: str, judge: str | None = None) -> list[tuple[str | None, bool]]:
    """The per-line verdicts written into the fixture by hand (the "expect" field, ignored by the scorer)."""
    rows = [json.loads(line) for line in (FIXTURES / task / "predictions.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        expect = row["expect"][judge] if judge else row["expect"]
        out.append(tuple(expect) if isinstance(expect, list) else (expect["answer"], expect["correct"]))
    return out


@pytest.mark.parametrize(
    "task, args, judge",
    [("m3cot", [], None), ("miniwob", [], None), ("geoqa", [], "letter"), ("geoqa", ["--task-arg", "judge=r3v"], "r3v")],
)
def test_json_summary_and_verdicts(tmp_path, task, args, judge):
    out = tmp_path / "verdicts.jsonl"
    result = run("--task", task, str(FIXTURES / task / "predictions.jsonl"), "--json", "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {"task", "n", "accuracy", "breakdown", "scoring"} and summary["scoring"] == "r3v"
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    want = expected(task, judge)
    assert [(v["answer"], v["correct"]) for v in verdicts] == want
    assert [v["line"] for v in verdicts] == list(range(1, len(want) + 1))
    assert summary["task"] == task and summary["n"] == len(want)
    assert summary["accuracy"] == pytest.approx(sum(c for _, c in want) / len(want))


def test_breakdown_follows_the_records(tmp_path):
    result = run("--task", "m3cot", str(FIXTURES / "m3cot" / "predictions.jsonl"), "--json")
    breakdown = json.loads(result.stdout)["breakdown"]
    rows = [json.loads(line) for line in (FIXTURES / "m3cot" / "predictions.jsonl").read_text().splitlines()]
    for key in ("domain", "topic"):
        for value, cell in breakdown[key].items():
            flags = [r["expect"]["correct"] for r in rows if r[key] == value]
            assert cell == {"n": len(flags), "accuracy": pytest.approx(sum(flags) / len(flags))}


def test_rich_table(tmp_path):
    result = run("--task", "miniwob", str(FIXTURES / "miniwob" / "predictions.jsonl"))
    assert result.exit_code == 0
    assert "3/6 correct" in result.stdout and "click-button" in result.stdout and "50.00%" in result.stdout


def test_clevr_synth_uses_the_generic_reader(tmp_path, clevr_task):
    examples = clevr_task.load("test", limit=3)
    lines = [
        {"question": examples[0].question, "answer": examples[0].answer, "prediction": f"Answer: {examples[0].answer}"},
        {"question": examples[1].question, "answer": examples[1].answer, "prediction": "I count many."},
        {"question": examples[2].question, "answer": examples[2].answer, "prediction": examples[2].answer},
    ]
    path = tmp_path / "clevr.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "v.jsonl"
    result = run("--task", "clevr-synth", str(path), "--json", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [json.loads(v)["correct"] for v in out.read_text().splitlines()] == [True, False, True]
    assert json.loads(result.stdout)["n"] == 3


# --- bad input -------------------------------------------------------------------------------------


def _with_bad_line(tmp_path: Path, bad: bytes) -> Path:
    good = (FIXTURES / "geoqa" / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    path = tmp_path / "preds.jsonl"
    path.write_bytes(good[0] + b"\n" + bad + b"\n" + b"".join(good[1:]))  # the bad line is line 3
    return path


BAD_LINES = {
    "malformed": (b'{"id": "x", "prediction": ', "malformed JSON"),
    "utf8": (b'{"id": "x", "prediction": "\xff\xfe"}', "not valid UTF-8"),
    "not an object": (b'["a list"]', "expected a JSON object"),
    "no prediction": (b'{"id": "x", "question": "q", "choices": ["1", "2"], "answer": "A"}', "missing field 'prediction'"),
    "no choices": (b'{"id": "x", "question": "q", "answer": "A", "prediction": "Answer: A"}', "missing field 'choices'"),
    "bad gold": (b'{"id": "x", "question": "q", "choices": ["1"], "answer": "C", "prediction": "A"}', "outside the 1 choices"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, name):
    bad, problem = BAD_LINES[name]
    path = _with_bad_line(tmp_path, bad)
    result = run("--task", "geoqa", str(path), "--json")
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert str(path) in message and "line 3" in message and problem in message


def test_skip_bad_counts_lists_and_keeps_order(tmp_path):
    path = _with_bad_line(tmp_path, BAD_LINES["no prediction"][0])
    out = tmp_path / "v.jsonl"
    result = run("--task", "geoqa", str(path), "--json", "--skip-bad", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad line" in result.stderr and "line 3" in result.stderr
    summary = json.loads(result.stdout)
    want = expected("geoqa", "letter")
    assert summary["n"] == len(want)
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["line"] for v in verdicts] == [1, 3, 4, 5, 6, 7]  # line 2 is blank
    assert verdicts[1] == {"line": 3, "correct": False, "answer": None, "error": "missing field 'prediction' (the raw model output)"}
    assert [(v["answer"], v["correct"]) for v in verdicts[:1] + verdicts[2:]] == want


def test_miniwob_bad_step_line(tmp_path):
    rows = (FIXTURES / "miniwob" / "predictions.jsonl").read_text().splitlines()
    broken = json.loads(rows[1])
    broken["action_type"] = "scroll"
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join([rows[0], json.dumps(broken), *rows[2:]]) + "\n")
    result = run("--task", "miniwob", str(path))
    assert result.exit_code != 0 and "line 2" in result.stderr and "action_type should be 'click' or 'type'" in result.stderr


def test_m3cot_reads_official_messages_and_rejects_neither(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "choices": ["x", "y"], "answer": "B", "messages": ["q", "(B)"]}) + "\n"
                    + json.dumps({"id": "b", "choices": ["x", "y"], "answer": "B", "messages": []}) + "\n")
    result = run("--task", "m3cot", str(path), "--json", "--skip-bad")
    assert json.loads(result.stdout) == {"task": "m3cot", "n": 1, "accuracy": 1.0, "breakdown": {}, "scoring": "r3v"}
    assert "line 2" in result.stderr


def test_usage_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run("--task", "geoqa", str(empty))
    assert result.exit_code != 0 and "no records to score" in result.stderr
    result = run("--task", "geoqa-x", str(FIXTURES / "geoqa" / "predictions.jsonl"))
    assert result.exit_code != 0 and "Did you mean 'geoqa'" in result.stderr
    result = run("--task", "geoqa", "--task-arg", "judge=coin", str(FIXTURES / "geoqa" / "predictions.jsonl"))
    assert result.exit_code != 0 and "judge must be one of" in result.stderr
    result = run("--task", "geoqa", "--task-arg", "judge", str(FIXTURES / "geoqa" / "predictions.jsonl"))
    assert result.exit_code != 0 and "KEY=VALUE" in result.stderr
    result = run("--task", "geoqa", str(tmp_path / "missing.jsonl"))
    assert result.exit_code != 0 and "does not exist" in result.stderr
