"""The loop at scale, on a CPU: training in a process of its own or in several (gloo), memory handed
back after training, the job file a user can rerun, tracking, and over-long items counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from volatile import jsonl_without_seconds, without_seconds

from r3v.cli import main
from r3v.records import TrainItem, read_jsonl
from r3v.tasks.clevr_synth import ClevrSynth
from r3v.train.data import encode_item, end_of_turn
from r3v.train.job import JOB_FILE, TrainJob

ROOT = Path(__file__).resolve().parents[1]
# r3v-clevr-base trains fully: one optimizer step of 16 items per epoch (the tiny preset's global batch)
ARGS = [
    "train", "--iterations", "1", "--model", "r3v-clevr-base", "--task", "clevr-synth",
    "--train-limit", "8", "--test-limit", "4", "--max-new-tokens", "32", "--epochs", "1",
    "--teacher-count", "8", "--chunk-size", "3", "--seed", "7",
]


def run_cli(out: Path, *extra: str):
    return CliRunner().invoke(main, [*ARGS, "--out", str(out), *extra], catch_exceptions=False)


def without_timing(out: Path) -> list[dict]:
    return [without_seconds({k: v for k, v in row.items() if k != "timing"}) for row in read_jsonl(out / "metrics.jsonl")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "run"
    result = run_cli(out, "--training-process", "inline")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_two_gloo_processes_give_the_weights_and_metrics_of_one(inline_run, tmp_path):
    """--num-processes 2 launches every training step with accelerate (DDP over gloo); the same
    global batch gives the same steps, so the same weights and the same metrics as one process."""
    out = tmp_path / "ddp"
    result = run_cli(out, "--num-processes", "2")
    assert result.exit_code == 0, result.output
    assert "training in a process of its own (2 process(es))" in result.output
    for k in (0, 1):
        manifest = json.loads((out / f"iter{k}" / "model" / "manifest.json").read_text())["settings"]
        assert manifest["batch"] == {"processes": 2, "per_device": 8, "accumulation": 1, "step_items": 16,
                                     "gradient_checkpointing": False}
        single = json.loads((inline_run / f"iter{k}" / "model" / "manifest.json").read_text())["settings"]
        assert single["batch"]["processes"] == 1 and single["batch"]["per_device"] == 16
        log = (out / f"iter{k}" / "model" / "train_process.log").read_text()
        assert "accelerate.commands.launch" in log and "--num_processes 2" in log
        ours = load_file(str(out / f"iter{k}" / "model" / "model" / "model.safetensors"))
        theirs = load_file(str(inline_run / f"iter{k}" / "model" / "model" / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert max(float((ours[key] - theirs[key]).abs().max()) for key in theirs) < 1e-5
    for name in ("iter1/samples.jsonl", "iter1/train_items.jsonl", "iter1/eval/greedy.jsonl", "iter1/eval/samples.jsonl"):
        assert jsonl_without_seconds(out / name) == jsonl_without_seconds(inline_run / name), name
    ours, theirs = without_timing(out), without_timing(inline_run)
    for row in ours + theirs:
        for key in ("train_losses",):
            row[key] = {name: round(value, 5) for name, value in (row[key] or {}).items()}
    assert ours == theirs
    # how each run executed is on record, and not part of what a rerun must match
    execution = json.loads((out / "run.json").read_text())["execution"]
    assert (execution["num_processes"], execution["training_process"]) == (2, "auto")
    assert json.loads((inline_run / "run.json").read_text())["execution"]["training_process"] == "inline"
    assert json.loads((out / "run.json").read_text())["settings"] == json.loads((inline_run / "run.json").read_text())["settings"]


def probe(tmp_path: Path, out: Path, *extra: str) -> dict[str, list[int]]:
    result_file = tmp_path / f"{out.name}.json"
    command = [sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(result_file), *ARGS, "--out", str(out), *extra]
    done = subprocess.run(command, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result_file.read_text())


@pytest.mark.slow
def test_no_model_parameters_stay_alive_around_training_inline(tmp_path):
    """Trained in the loop's own process: before each step the generation model is gone, and once
    the step returns nothing it built (model, optimizer, Trainer) is alive."""
    counts = probe(tmp_path, tmp_path / "inline", "--training-process", "inline")
    assert counts["run_job before"] == [0, 0] and counts["run_job after"] == [0, 0]
    assert counts["at exit"] == [0]


@pytest.fixture(scope="module")
def separate_run(tmp_path_factory):
    """One single-process run with training in its own process, trackers on, and a small
    max_length so that some items are cut; the tests below read it."""
    tmp_path = tmp_path_factory.mktemp("separate")
    out = tmp_path / "run"
    counts = probe(tmp_path, out, "--training-process", "separate", "--report-to", "tensorboard", "--max-length", "95")
    return out, counts


@pytest.mark.slow
def test_no_model_parameters_in_the_orchestrator_while_training_runs_apart(separate_run):
    out, counts = separate_run
    # launch_job blocks while the training process runs: what is alive here then is what "before" saw
    assert counts["launch_job before"] == [0, 0] and counts["launch_job after"] == [0, 0]
    assert counts["at exit"] == [0]
    assert "run_job before" not in counts  # no training ran in this process
    resources = json.loads((out / "resources.json").read_text())
    training = resources["iterations"]["1"]["training"]
    # the training process's own peak, which this process (holding no model) never reaches
    assert training["peak_rss_mib"] > 0 and training["tokens"] > 0 and training["tokens_per_second"] > 0
    for phase in ("loading", "sampling", "evaluation", "building"):
        assert resources["iterations"]["1"][phase]["peak_rss_mib"] > 0
    assert resources["device"] == "cpu"


@pytest.mark.slow
def test_the_job_file_reruns_that_step_by_hand(separate_run, tmp_path):
    """iter1/train_job.yaml holds the whole step: rerun by hand into another folder, it trains the
    same weights."""
    out, _ = separate_run
    job = TrainJob.read(out / "iter1" / JOB_FILE)
    assert job.items == "train_items.jsonl" and job.out == "model" and job.model == "r3v-clevr-base"
    assert job.examples.task == "clevr-synth" and job.examples.limit == 8 and job.config.max_length == 95
    job.out, job.tracking_dir = str(tmp_path / "again"), None
    job.config.report_to = ()
    copy = job.write(out / "iter1" / "by_hand.yaml")
    done = subprocess.run([sys.executable, "-m", "r3v.train", "--job", str(copy)], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = load_file(str(tmp_path / "again" / "model" / "model.safetensors"))
    theirs = load_file(str(out / "iter1" / "model" / "model" / "model.safetensors"))
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.slow
def test_trackers_get_the_training_curves_and_each_iterations_metrics(separate_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = separate_run
    loop = EventAccumulator(str(out / "tracking" / "tensorboard" / "loop"))
    loop.Reload()
    rows = read_jsonl(out / "metrics.jsonl")
    test_at_1 = [(event.step, event.value) for event in loop.Scalars("r3v/test_at_1")]
    assert test_at_1 == [(row["iteration"], pytest.approx(row["test_accuracy"])) for row in rows]
    assert [e.value for e in loop.Scalars("r3v/sel_at_3")] == [pytest.approx(rows[1]["select_accuracy"])]
    assert [e.value for e in loop.Scalars("r3v/items/refine")] == [rows[0]["items"]["refine"], rows[1]["items"]["refine"]]
    losses = [e.value for e in loop.Scalars("r3v/loss/sft")]
    assert losses == [pytest.approx(row["train_losses"]["sft"]) for row in rows]
    # the Trainer's own records of each training step, beside the loop's (one step per epoch here,
    # fewer than logging_steps, so the Trainer writes its end-of-training summary)
    for k in (0, 1):
        step = EventAccumulator(str(out / "tracking" / "tensorboard" / f"iter{k}"))
        step.Reload()
        (loss,) = step.Scalars("train/train_loss")
        assert 0 < loss.value < 20


@pytest.mark.slow
def test_items_longer_than_max_length_are_counted_per_kind(separate_run):
    """build.json, the trainer's summary and the metrics row count the over-long items of each kind,
    as encoding each stored item shows."""
    from r3v.models.loading import load_model

    out, _ = separate_run
    task = ClevrSynth()
    examples = {ex.id: ex for ex in task.load("train", limit=8)}
    processor = load_model("r3v-clevr-base").processor
    end = end_of_turn(processor)
    rows = read_jsonl(out / "metrics.jsonl")
    seen_any = False
    for k in (0, 1):
        expected: dict[str, dict[str, int]] = {"skipped": {}, "truncated": {}}
        for record in read_jsonl(out / f"iter{k}" / "train_items.jsonl"):
            item = TrainItem.from_dict(record)
            _, status = encode_item(processor, item.prompt, item.target, examples[item.example_id].load_images(), end, 95)
            if status != "ok":
                expected[status][item.kind] = expected[status].get(item.kind, 0) + 1
        seen_any |= any(expected.values())
        assert json.loads((out / f"iter{k}" / "build.json").read_text())["over_length"] == expected
        assert json.loads((out / f"iter{k}" / "model.json").read_text())["train"]["over_length"] == expected
        assert rows[k]["over_length"] == expected
    assert seen_any  # max_length 95 must cut something, or this proves nothing


@pytest.mark.slow
def test_external_training_waits_for_the_job_to_be_run_elsewhere(inline_run, tmp_path):
    """--training-process external (several nodes): the loop writes each iteration's job and waits;
    whoever runs the job (here: `python -m r3v.train --job`, as each node's accelerate launch would)
    gives the loop its model, and the run ends as an inline one does."""
    import time

    out = tmp_path / "external"
    command = [sys.executable, "-m", "r3v.cli", *ARGS, "--training-process", "external", "--out", str(out)]
    loop = subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for k in (0, 1):
            job = out / f"iter{k}" / JOB_FILE
            deadline = time.monotonic() + 300
            while not job.exists():
                assert loop.poll() is None, loop.stdout.read()
                assert time.monotonic() < deadline, f"{job} did not appear"
                time.sleep(0.2)
            assert not (out / f"iter{k}" / "model.json").exists()  # the loop waits for the job
            done = subprocess.run([sys.executable, "-m", "r3v.train", "--job", str(job)], env=env(), cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        output, _ = loop.communicate(timeout=300)
    finally:
        if loop.poll() is None:
            loop.kill()
    assert loop.returncode == 0, output
    assert "waiting for this training job to be run elsewhere" in output
    assert without_timing(out) == without_timing(inline_run)
