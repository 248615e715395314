"""The CLI's tables fit an 80-column terminal: rendered at width 80, no line is longer and no cell
is cut short (rich marks a cut cell with "…")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from r3v.cli.bench import diagnostics_table, render_table
from r3v.cli.list_cmd import registry_table
from r3v.cli.score import _table as score_table
from r3v.metrics import metric_name
from r3v.registry import selectors, tasks
from r3v.scoring import score_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WIDTH = 80


def rendered(table: Table) -> str:
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None)
    console.print(table)
    return console.file.getvalue()


def assert_fits(text: str) -> None:
    assert "…" not in text, f"a cell was cut:\n{text}"
    too_long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not too_long, f"lines over {WIDTH} columns:\n" + "\n".join(too_long)


def test_list_table_fits():
    text = rendered(registry_table())
    assert_fits(text)
    for name in tasks.names():  # every task is listed, with its options
        assert name in text
    assert "relaxed" in text and "judge" in text


def _bench_results(chosen: list[str], n: int) -> dict:
    """Results in the shape ``r3v.bench.run_bench`` returns, for every selector shown."""
    ks = [k for k in (1, 3, 5, 7, 9) if k <= n]
    shown = ["first", "majority", *[s for s in chosen if s not in ("first", "majority")]]
    ladder = {str(k): {**{metric_name(s, k): 0.123 for s in shown}, f"pass@{k}": 0.987} for k in ks}
    # a model path longer than the terminal is wide: the title must fold it, not cut it
    model = "/checkpoints/" + "qwen2-vl-7b-instruct-r3v-iteration-3-merged-with-its-lora-adapter" * 2
    compute = {str(k): {s: {"tokens_per_question": 123_456.7, "seconds_per_question": 1.5} for s in shown} for k in ks}
    diagnostics = {s: {"right_when_possible": 0.5, "agreement_with_majority": 0.75,
                       "positions": {str(p): 12_345 for p in range(1, n + 1)},
                       "when_none_right": {"questions": 9, "abstained": 1, "a candidate's answer": 7, "a new answer": 1}}
                   for s in shown}
    return {"task": "clevr-math", "model": model, "examples": 12_345, "n": n, "ks": ks, "ladder": ladder,
            "compute": compute, "diagnostics": diagnostics}


@pytest.mark.parametrize("n", [3, 9])
def test_bench_table_fits_with_every_selector(n):
    chosen = [name for name in selectors.names() if name not in ("first", "majority")]
    results = _bench_results(chosen, n)
    text = rendered(render_table(results, chosen))
    assert_fits(text)
    assert "Test@1" in text and "pass@k" in text and "sel@k" in text and "tok/q sel" in text
    text = rendered(diagnostics_table(results, chosen))
    assert_fits(text)
    assert "self-select" in text and "0.750" in text


def _predictions(tmp_path: Path, name: str) -> Path:
    """One scoring line per fixture record, each predicting its own gold answer or nothing."""
    if name == "tabmwp":
        problems = json.loads((FIXTURES / "tabmwp" / "problems_test.json").read_text())
        rows = [{**problem, "pid": pid, "prediction": problem["answer"] if i % 2 else "no idea"}
                for i, (pid, problem) in enumerate(problems.items())]
    else:  # fixtures that already hold prediction files
        return FIXTURES / name / "predictions.jsonl"
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_table_fits_a_breakdown_value_longer_than_a_column(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "m3cot" / "predictions.jsonl").read_text().splitlines()]
    rows[0]["topic"] = "a-topic-name-written-as-one-word-" * 3
    path = tmp_path / "m3cot.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = rendered(score_table(score_file(tasks.get("m3cot")(), path)))
    assert_fits(text)
    assert "a-topic-name-written" in text


@pytest.mark.parametrize("name", ["tabmwp", "m3cot", "miniwob", "geoqa"])
def test_score_table_fits(tmp_path, name):
    report = score_file(tasks.get(name)(), _predictions(tmp_path, name))
    assert report.breakdown  # the breakdown rows are the long ones
    text = rendered(score_table(report))
    assert_fits(text)
    for groups in report.breakdown.values():
        assert all(value in text for value in groups)


def test_distill_report_table_fits(tmp_path):
    from r3v.cli.distill import report_table
    from r3v.distill import DistillReport, TryReport

    tries = [TryReport(number, 1000 // number, 400 // number, 1000 // number, 512 // number, 400_000, 800_000)
             for number in (1, 2, 3)]
    report = DistillReport("gpt-4o-mini-2024-07-18", "clevr-math", "train",
                           str(tmp_path / "warmup" / "distilled_clevr_math_gpt-4o-mini.jsonl"), 1000, 873, 873,
                           tries, 1_234_567, 2_345_678, 12.3456, {"requests": 1500, "retries": 7,
                                                                  "prompt_tokens": 1_234_567,
                                                                  "completion_tokens": 2_345_678}, 12.3456)
    text = rendered(report_table(report))
    assert_fits(text)
    assert "873 (87.3%)" in text
