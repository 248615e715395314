"""``r3v train``: a warm-up plus one self-training iteration, rerun, refusal, kill and resume.

The runs use r3v-clevr-base, the shipped tiny Qwen2-VL that already answers clevr-synth
sometimes: a randomly initialised tiny model is never right, so no self-CoT, self-refine or
self-select item would ever be built or trained.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from volatile import jsonl_without_seconds, without_seconds

from r3v.builders import build_mixture
from r3v.cli import main
from r3v.cli.train import method_name, parse_sizes
from r3v.config import BuildConfig
from r3v.errors import DataError
from r3v.loop import check_run_dir
from r3v.records import Sample, TrainItem, read_jsonl
from r3v.tasks.clevr_synth import ClevrSynth

ARGS = [
    "train", "--iterations", "1", "--model", "r3v-clevr-base", "--task", "clevr-synth",
    "--train-limit", "8", "--test-limit", "4", "--max-new-tokens", "32", "--epochs", "1",
    "--teacher-count", "8", "--chunk-size", "3", "--seed", "7",
]
TIMING_FREE = ("timing",)


def run_cli(out: Path, *extra: str):
    return CliRunner().invoke(main, [*ARGS, "--out", str(out), *extra], catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "run"
    result = run_cli(out)
    assert result.exit_code == 0, result.output
    return out, result.output


def samples(path: Path) -> list[Sample]:
    return [Sample.from_dict(r) for r in read_jsonl(path)]


def metrics_without_timing(out: Path) -> list[dict]:
    return [without_seconds({k: v for k, v in row.items() if k not in TIMING_FREE}) for row in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow
def test_one_iteration_end_to_end(finished_run):
    out, output = finished_run
    task = ClevrSynth()
    train = task.load("train", limit=8)
    test = task.load("test", limit=4)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [0, 1]
    warm, first = rows

    # iteration 0: the warm-up mixture, QA for every question plus the teacher's CoT
    assert warm["items"] == {"qa": 8, "distill": 8, "cot": 0, "refine": 0, "select": 0}
    assert warm["items_per_objective"]["sft"] == 16
    assert warm["select_accuracy"] is None and warm["train_steps"] > 0
    assert set(warm["train_losses"]) >= {"sft"}

    # iteration 1 sampled every train question 3 times with iteration 0's model
    drawn = samples(out / "iter1" / "samples.jsonl")
    assert sorted((s.example_id, s.sample_index) for s in drawn) == sorted((ex.id, j) for ex in train for j in range(3))
    assert {s.iteration for s in drawn} == {1}
    assert first["train_samples"]["samples"] == 24
    by_id = {ex.id: ex for ex in train}
    for s in drawn:  # each verdict is the task's own scoring of the stored text
        assert s.correct == task.is_correct(task.extract(s.text, by_id[s.example_id]), by_id[s.example_id])

    # the stored mixture is exactly what the builders make of that pool
    stored_items = [TrainItem.from_dict(r) for r in read_jsonl(out / "iter1" / "train_items.jsonl")]
    warm_items = [i for i in stored_items if i.kind in ("qa", "distill")]
    # with the run's build settings: the defaults and what the model's r3v.json recommends
    build = BuildConfig.from_dict(json.loads((out / "run.json").read_text())["settings"]["build"])
    assert build.seed == 7
    rebuilt = build_mixture(task, train, drawn, build, 1, sorted(warm_items, key=repr))
    assert sorted(map(repr, rebuilt.items)) == sorted(map(repr, stored_items))
    assert first["items"] == rebuilt.counts
    # the run must have exercised every objective, or the checks above prove little
    assert min(first["items"][kind] for kind in ("cot", "refine", "select")) > 0
    assert set(first["train_losses"]) == {"sft", "refine", "select"}
    assert first["items_per_objective"] == {
        "sft": sum(first["items"][k] for k in ("qa", "distill", "cot")),
        "refine": first["items"]["refine"], "select": first["items"]["select"],
    }

    # evaluation numbers follow from the stored test samples
    for row, k in ((warm, 0), (first, 1)):
        greedy = samples(out / f"iter{k}" / "eval" / "greedy.jsonl")
        assert len(greedy) == 4
        assert row["test_accuracy"] == pytest.approx(sum(s.correct for s in greedy) / 4)
    candidates = samples(out / "iter1" / "eval" / "samples.jsonl")
    assert len(candidates) == 12
    any_right = {ex.id: any(s.correct for s in candidates if s.example_id == ex.id) for ex in test}
    assert first["pass_at_n"] == pytest.approx(sum(any_right.values()) / 4)
    assert 0.0 <= first["select_accuracy"] <= 1.0
    assert sum(first["select_how"].values()) == 4

    # records: manifest, timing per phase, summary table
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["seed"] == 7 and manifest["settings"]["build"]["method"] == "r3v"
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["total"]) == {"loading", "sampling", "scoring", "building", "training", "evaluation"}
    assert timing["total"]["training"] > 0 and timing["total"]["sampling"] > 0
    assert all(row["timing"]["training"] > 0 for row in rows)
    assert "Test@1" in output and "time per phase" in output
    for k in (0, 1):
        assert (out / f"iter{k}" / "model" / "r3v_train_done.json").exists()


def test_rerun_does_no_new_work(finished_run):
    out, _ = finished_run
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    result = run_cli(out)
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before


def test_rerun_with_other_settings_is_refused(finished_run):
    out, _ = finished_run
    result = CliRunner().invoke(main, [*ARGS, "--out", str(out), "--select-target", "solution"])
    assert result.exit_code != 0
    assert "other settings" in result.output and "select_target" in result.output
    # the flag reaches the run's build settings
    result = CliRunner().invoke(main, [*ARGS, "--out", str(out), "--check-equations"])
    assert result.exit_code != 0
    assert "build.check_equations" in result.output
    result = CliRunner().invoke(main, [*ARGS, "--out", str(out), "--check-steps"])
    assert result.exit_code != 0
    assert "build.check_steps" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    [
        "iter1/samples.jsonl",  # mid-sampling: the first chunk is on disk
        "iter0/model.json",  # between phases: iteration 0 trained, not yet evaluated
        "iter1/model/train_log.jsonl",  # mid-epoch: the first optimizer step of iteration 1 is logged
    ],
)
def test_kill_and_resume_matches_uninterrupted_run(finished_run, tmp_path, kill_at):
    reference, _ = finished_run
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "from r3v.cli import main; main()", *ARGS, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    target = out / kill_at
    deadline = time.monotonic() + 120
    try:
        while not (target.exists() and target.stat().st_size > 0):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"{kill_at} did not appear"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "iter1" / "eval" / "results.json").exists()  # it died mid-run

    result = run_cli(out)
    assert result.exit_code == 0, result.output
    for name in ("iter1/samples.jsonl", "iter1/train_items.jsonl", "iter1/eval/greedy.jsonl", "iter1/eval/samples.jsonl",
                 "iter0/eval/greedy.jsonl"):
        assert jsonl_without_seconds(out / name) == jsonl_without_seconds(reference / name), name
    assert metrics_without_timing(out) == metrics_without_timing(reference)


def test_run_dir_guard(tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an r3v train run"):
        check_run_dir(stranger, {"seed": 0})
    run = tmp_path / "run"
    check_run_dir(run, {"seed": 0, "task": "clevr-synth"})
    check_run_dir(run, {"seed": 0, "task": "clevr-synth"})  # same settings: continue
    with pytest.raises(DataError, match="seed: 0 -> 1"):
        check_run_dir(run, {"seed": 1, "task": "clevr-synth"})


def test_method_flags_and_sizes():
    assert method_name("r3v", False, False) == "r3v"
    assert method_name("r3v", True, False) == "no_refine"
    assert method_name("r3v", False, True) == "no_select"
    assert method_name("r3v", True, True) == "star"
    assert method_name("star", False, False) == "star"
    assert parse_sizes("2, 3,4,5,6") == (2, 3, 4, 5, 6)
    import click

    for bad in ("1", "7", "x", ""):
        with pytest.raises(click.BadParameter):
            parse_sizes(bad)


@pytest.mark.slow
def test_warmup_only_run_with_an_r3v_warmup_file(shared_fixtures, tmp_path):
    """--iterations 0 trains the warm-up alone; the distilled CoT comes from R3V's own file format."""
    import shutil

    from PIL import Image

    warm = tmp_path / "gpt_cot.json"
    shutil.copy(shared_fixtures / "clevr_math" / "gpt_cot_sample.json", warm)
    records = json.loads(warm.read_text())
    for record in records:  # the fixture ships without its CLEVR renders
        Image.new("RGB", (56, 56), (120, 40, 40)).save(tmp_path / record["image"])
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--iterations", "0", "--model", "r3v-clevr-base", "--train-limit", "4", "--test-limit", "2",
        "--max-new-tokens", "16", "--epochs", "1", "--warmup-file", str(warm), "--out", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["items"]["qa"] == 4 and row["items"]["distill"] == len(records)
    assert row["select_accuracy"] is None and row["train_steps"] > 0
    distilled = [TrainItem.from_dict(r) for r in read_jsonl(out / "iter0" / "train_items.jsonl") if r["kind"] == "distill"]
    assert sorted(Path(i.images[0]).name for i in distilled) == sorted(r["image"] for r in records)
    assert json.loads((out / "run.json").read_text())["settings"]["warmup_file"]["name"] == "gpt_cot.json"


def test_dev_runs_script_records_a_finished_run(finished_run, load_module):
    """benchmarks/dev_runs.py quotes what the loop wrote, not numbers of its own."""
    dev_runs = load_module("benchmarks/dev_runs.py")
    out, _ = finished_run
    run = dev_runs.read_run(out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert run["test_accuracy_by_iteration"] == [row["test_accuracy"] for row in rows]
    assert run["self_select_accuracy_by_iteration"] == [row["select_accuracy"] for row in rows]
    assert run["majority_accuracy_by_iteration"][1] == rows[1]["majority_accuracy"] is not None
    assert run["train_questions"] == 8 and run["epochs"] == 1
    from r3v.loop import resolve_config

    demo_build = resolve_config({"model": "r3v-clevr-base"}).build
    assert run["select_sizes"] == list(demo_build.select_sizes)
    assert run["select_sizes_per_question"] == demo_build.select_sizes_per_question
    assert run["selection_ladder"] is None  # not benched
    from r3v.models.loading import resolve_model

    assert run["base_sha256"] == dev_runs.weights_sha256(resolve_model("r3v-clevr-base")) is not None
    table = dev_runs.markdown([run], {"date": "d", "cpu": "c", "cores": 2})
    rates = f"{run['temperature']:g} / {run['learning_rate']:g}"
    row = next(line for line in table.splitlines()
               if line.startswith(f"| {out.name} | clevr-synth | 0 | 8 / 4 | 1 | {rates} | cot+refine+select, select on 2-6 (1 drawn per question) |"))
    assert " → ".join(f"{value:.3f}" for value in run["test_accuracy_by_iteration"]) in row
    # inside the rationales: the greedy test answers of the first and the last iteration
    from r3v.builders import equations_hold

    assert set(run["rationales"]) == {"0", "1"}
    for iteration, shares in run["rationales"].items():
        greedy = read_jsonl(out / f"iter{iteration}" / "eval" / "greedy.jsonl")
        # an equation is written (a regex of its own here) and it holds
        right = sum(bool(re.search(r"\d+ [-+] \d+ = \d+", r["text"])) and equations_hold(r["text"]) for r in greedy)
        assert shares["test_equations_right"] == round(right / len(greedy), 4)
        assert 0 <= shares["test_rationales_faithful"] <= 1
        assert shares["positives_faithful"] is None if iteration == "0" else 0 <= shares["positives_faithful"] <= 1
        # every step by the task's own checker, counted here over the same answers
        from r3v.tasks.clevr_synth import ClevrSynth

        task = ClevrSynth()
        examples = {ex.id: ex for ex in task.load("test")}
        held = sum(task.check_steps(r["text"], examples[r["example_id"]]) for r in greedy)
        assert shares["test_steps_hold"] == round(held / len(greedy), 4)
    # a run read again replaces its record in place; the others stay
    assert dev_runs.merged([{"run": "a", "x": 1}, {"run": out.name, "x": 2}], [run]) == [{"run": "a", "x": 1}, run]
