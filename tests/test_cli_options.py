"""The data flags (--task-arg, --skip-bad, --allow-outside-paths) work alike in every command that
builds a task, and the commands' defaults are the dataclasses' (``BenchConfig``, ``DistillConfig``).

Every test here stops before a model would load, or needs none (score, export), so none is slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from r3v.bench import BenchConfig
from r3v.cli import main
from r3v.cli.bench import bench
from r3v.cli.distill import distill
from r3v.cli.export import export
from r3v.cli.generate import generate
from r3v.cli.score import score
from r3v.distill import DistillConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TASK_COMMANDS = {"generate": generate, "bench": bench, "distill": distill, "score": score, "export": export}
DATA_FLAGS = ("task_args", "skip_bad", "allow_outside_paths")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def defaults(command: click.Command) -> dict:
    return {param.name: param.default for param in command.params}


@pytest.mark.parametrize("name", sorted(TASK_COMMANDS))
def test_every_task_command_takes_the_data_flags(name):
    params = {param.name: param for param in TASK_COMMANDS[name].params}
    assert set(DATA_FLAGS) <= set(params), name
    assert params["task_args"].multiple and params["skip_bad"].is_flag and params["allow_outside_paths"].is_flag
    # one wording everywhere: the help of each flag is the same in every command
    for flag in DATA_FLAGS:
        assert params[flag].help == {p.name: p for p in generate.params}[flag].help
    if name != "score":  # score reads its records from FILE, not from a data folder
        assert "data_dir" in params


def test_generate_and_bench_default_to_bench_config():
    config = BenchConfig()
    sampling = config.sampling
    for command in (generate, bench):
        given = defaults(command)
        assert (given["n"], given["temperature"], given["top_p"], given["top_k"], given["max_new_tokens"],
                given["seed"], given["greedy"]) == (sampling.n, sampling.temperature, sampling.top_p, sampling.top_k,
                                                   sampling.max_new_tokens, sampling.seed, sampling.greedy)
        assert given["chunk_size"] == config.chunk_size
    assert defaults(bench)["n_ladder"] == ",".join(map(str, config.ladder))
    assert set(defaults(bench)["selector_names"]) | {"first", "majority", "oracle"} == set(config.selectors)
    help_text = invoke("generate", "--help").output
    assert f"[default: {sampling.temperature}]" in help_text and f"[default: {sampling.n}]" in help_text


def test_distill_defaults_to_distill_config():
    config = DistillConfig(teacher="t", task="clevr-synth")
    given = defaults(distill)
    for field in ("split", "limit", "tries", "n", "keep_per_question", "temperature", "top_p", "top_k",
                  "max_new_tokens", "seed", "chunk_size", "answer_hint"):
        assert given[field] == getattr(config, field), field
    assert given["backend_name"] == config.backend
    assert f"[default: {config.max_new_tokens}]" in invoke("distill", "--help").output


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--task", "chartqa", "--task-arg", "subset=machine", "--out", "x.jsonl"],
        ["bench", "--task", "chartqa", "--task-arg", "subset=machine"],
        ["distill", "--teacher", "t", "--task", "chartqa", "--task-arg", "subset=machine", "--out", "x.jsonl"],
        ["score", "--task", "chartqa", "--task-arg", "subset=machine", str(FIXTURES / "m3cot" / "predictions.jsonl")],
        ["export", "--lmms-tasks", "out", "--task", "chartqa", "--task-arg", "subset=machine"],
    ],
    ids=lambda args: args[0],
)
def test_a_bad_task_arg_is_a_usage_error_naming_task_and_key(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "--task-arg" in result.output and "'chartqa'" in result.output and "subset" in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_an_unknown_task_arg_lists_the_keys_the_task_takes():
    result = invoke("score", "--task", "geoqa", "--task-arg", "jugde=r3v", str(FIXTURES / "geoqa" / "predictions.jsonl"))
    assert result.exit_code == 2
    assert "jugde" in result.output and "judge" in result.output and "hf_dataset" in result.output


def _chart_predictions(tmp_path: Path) -> Path:
    """ChartQA fixture records with a non-zero number for gold, each predicted as a percentage
    ("0.57" -> "57%"): right under relaxed accuracy (a trailing % is a percentage), wrong under
    R3V's rule."""
    records = json.loads((FIXTURES / "chartqa" / "test" / "test_human.json").read_text())
    rows = []
    for record in records:
        try:
            value = float(record["label"])
        except ValueError:
            continue
        if value:
            rows.append({**record, "prediction": f"Answer: {round(value * 100, 6):g}%"})
    path = tmp_path / "chart.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_task_arg_and_skip_bad_together(tmp_path):
    path = _chart_predictions(tmp_path)
    plain = json.loads(invoke("score", "--task", "chartqa", str(path), "--json").stdout)
    relaxed = json.loads(invoke("score", "--task", "chartqa", "--task-arg", "relaxed=true", str(path), "--json").stdout)
    assert relaxed["accuracy"] == 1.0 and plain["accuracy"] < 1.0
    # --skip-bad keeps its meaning in score: bad input lines are skipped, the rest scored
    path.write_text(path.read_text() + "{not json\n")
    assert invoke("score", "--task", "chartqa", "--task-arg", "relaxed=true", str(path)).exit_code != 0
    result = invoke("score", "--task", "chartqa", "--task-arg", "relaxed=true", "--skip-bad", str(path), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["n"] == relaxed["n"]
    assert "malformed JSON" in result.stderr


def test_export_carries_task_args_and_skips_bad_records(tmp_path, load_module):
    data = tmp_path / "chartqa"
    shutil.copytree(FIXTURES / "chartqa", data)
    records = json.loads((data / "test" / "test_human.json").read_text())
    records[0]["imgname"] = "missing.png"  # a bad record: its chart is not there
    (data / "test" / "test_human.json").write_text(json.dumps(records))
    out = tmp_path / "lmms"
    args = ["export", "--lmms-tasks", str(out), "--task", "chartqa", "--data-dir", str(data), "--task-arg", "relaxed=true"]
    refused = invoke(*args)
    assert refused.exit_code != 0 and "missing.png" in refused.output
    result = invoke(*args, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad record" in result.stderr and "missing.png" in result.stderr
    docs = [json.loads(line) for line in (out / "r3v_chartqa.jsonl").read_text().splitlines()]
    assert len(docs) == len(records) - 1
    hooks = load_module(out / "r3v_chartqa_utils.py", "r3v_chartqa_utils_under_test")
    assert hooks.TASK_ARGS == {"relaxed": "true"}
    doc = next(d for d in docs if d["answer"] == "0.57")
    assert hooks.process_results(doc, ["Answer: 57%"]) == {"accuracy": 1.0}  # relaxed: a percentage


def test_allow_outside_paths_reaches_the_loader(tmp_path):
    data = tmp_path / "data" / "chartqa"
    shutil.copytree(FIXTURES / "chartqa", data)
    records = json.loads((data / "test" / "test_human.json").read_text())
    shutil.copy(data / "test" / "png" / records[0]["imgname"], tmp_path / "outside.png")
    records[0]["imgname"] = "../../../../outside.png"
    (data / "test" / "test_human.json").write_text(json.dumps(records))
    args = ["export", "--lmms-tasks", str(tmp_path / "lmms"), "--task", "chartqa", "--data-dir", str(data)]
    refused = invoke(*args)
    assert refused.exit_code != 0 and "escapes the data root" in refused.output
    assert invoke(*args, "--allow-outside-paths").exit_code == 0
