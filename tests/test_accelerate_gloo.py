"""Data-parallel training through ``accelerate launch`` with r3v/configs/accelerate/ddp.yaml, on two CPU
processes (gloo), against the same global batch trained in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from r3v.config import SHIPPED_CONFIGS
from r3v.models.presets import tiny_preset
from r3v.records import TrainItem, write_jsonl
from r3v.train import DONE_FILE, LOG_FILE, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = SHIPPED_CONFIGS / "accelerate"
SETTINGS = {"batch_size": 2, "global_batch": 4, "epochs": 2, "logging_steps": 1, "warmup_ratio": 0.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_accelerate_config_parses_with_accelerate():
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    assert load_config_from_file(str(CONFIGS / "zero3.yaml")).deepspeed_config["zero_stage"] == 3
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tiny_qwen, clevr_task, tmp_path):
    examples = clevr_task.load("train", limit=8)
    items = [TrainItem("qa" if i % 2 else "cot", ex.id, clevr_task.cot_prompt(ex), clevr_task.teacher_rationale(ex))
             for i, ex in enumerate(examples)]
    items_path = tmp_path / "items.jsonl"
    write_jsonl(items_path, items)
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "r3v.train", "--model", tiny_qwen, "--items", str(items_path), "--task", "clevr-synth",
        "--out", str(out), "--preset", "tiny",
    ] + [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / DONE_FILE).read_text())["result"]
    manifest = json.loads((out / "manifest.json").read_text())["settings"]
    assert manifest["batch"] == {"processes": 2, "per_device": 2, "accumulation": 1, "step_items": 4,
                                 "gradient_checkpointing": False}
    assert Path(result["output_path"]) == out / "model" and (out / "model" / "model.safetensors").exists()
    ddp_log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == [1, 2, 3, 4]  # rank 0 alone writes, once per step
    # The loss each rank back-propagated, averaged over ranks by the Trainer, is the global token mean.
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    backpropagated = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert backpropagated == pytest.approx([r["loss"] for r in ddp_log], rel=1e-6)

    # One process, 2 items per micro-batch, 2 micro-batches per step: the same items per step.
    config = TrainConfig.from_dict({**tiny_preset().to_dict(), **SETTINGS})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(tiny_qwen, items, {ex.id: ex for ex in examples}, config, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    single_log = [json.loads(line) for line in (tmp_path / "single" / LOG_FILE).read_text().splitlines()]
    for ours, theirs in zip(ddp_log, single_log, strict=True):
        assert ours["target_tokens"] == theirs["target_tokens"] and ours["tokens"] == theirs["tokens"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    weights = load_file(str(out / "model" / "model.safetensors"))
    reference = load_file(str(Path(single.output_path) / "model.safetensors"))
    assert max(float((weights[k] - reference[k]).abs().max()) for k in reference) < 1e-6
