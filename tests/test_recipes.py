"""The published settings as configs (``r3v/configs/reference/``): each loads with the reference
behaviour of its release, and each runs one iteration on a tiny model over real benchmark
samples laid out as the recipe expects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from r3v.cli import main
from r3v.config import SHIPPED_CONFIGS, config_file
from r3v.loop import resolve_config
from r3v.models.presets import named_preset
from r3v.records import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = sorted(p.stem for p in (SHIPPED_CONFIGS / "reference").glob("*.yaml"))
#: The tiny model of each recipe's family (Qwen-VL-Chat is remote code: a tiny Qwen2-VL stands in).
TINY = {"qwen-vl-chat": "tiny-qwen2-vl", "llava-1.5-7b": "tiny-llava", "qwen2-vl-7b": "tiny-qwen2-vl"}


def recipe(name: str) -> dict:
    return yaml.safe_load(config_file(f"reference/{name}").read_text())


def test_there_is_one_recipe_per_published_setting():
    assert RECIPES == [f"{family}-{task}" for family in ("llava-1.5-7b", "qwen-vl-chat")
                       for task in ("chartqa", "clevr-math", "tabmwp")] + ["qwen2-vl-7b-geoqa"]


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_resolves_to_its_releases_behaviour(name):
    config = resolve_config(recipe(name))
    release_b = config.task.name == "geoqa"
    assert config.reference
    assert config.task.args["prompts"] == "reference" and config.task.args["scoring"] == "official"
    assert (config.eval.select.skip_when_agree, config.eval.select.unparseable) == (False, "wrong")
    assert config.eval.samples == 3 and config.sampling.n == 3
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (0.9, 0.95, 50)
    assert config.sampling.max_new_tokens == (200 if release_b else 384)
    train = config.train_config(named_preset(config.train_preset))
    assert (train.learning_rate, train.epochs, train.global_batch, train.max_length) == (3e-5, 3, 64, 2048)
    assert (train.adam_beta1, train.adam_beta2, train.adam_epsilon) == (0.9, 0.98, 1e-6)
    assert train.loss_mean == ("global" if release_b else "micro_batch")
    lora = (train.lora_r, train.lora_alpha, train.lora_dropout)
    assert lora == {"qwen-vl-chat": (64, 16, 0.05), "llava-1.5-7b": (128, 256, 0.05),
                    "qwen2-vl-7b": (8, 16, 0.0)}[name.rsplit("-", 2 if "clevr" in name else 1)[0]]
    value_target = config.task.name in ("chartqa", "clevr-math")
    assert config.build.select_target == ("value" if value_target else "answer")
    assert (config.build.rationale_min_chars, config.build.drop_answer_first) == ((50, True) if release_b else (0, False))
    if release_b:
        assert config.warmup.skip_training and config.warmup.file is None
    else:
        assert Path(config.warmup.file).name.endswith("_sft_gpt.json")
    if name.startswith("llava"):
        assert config.task.args["cot_instruction"] == "Let's think step by step."


def test_an_explicit_setting_beats_the_reference():
    config = resolve_config(recipe("qwen2-vl-7b-geoqa"), {"eval": {"select": {"skip_when_agree": True}}},
                            {"task": {"args": {"scoring": "r3v"}}})
    assert config.eval.select.skip_when_agree and config.eval.select.unparseable == "wrong"
    assert config.task.args == {"prompts": "reference", "scoring": "r3v"}


# ---------------------------------------------------------------- one iteration of each


def lay_out(task: str, data_dir: Path) -> None:
    """The recipe's data folder from the fixtures, the test split doubling as the train split."""
    if task == "tabmwp":
        shutil.copytree(FIXTURES / "tabmwp", data_dir)
        shutil.copy(data_dir / "problems_test.json", data_dir / "problems_train.json")
    elif task == "chartqa":
        shutil.copytree(FIXTURES / "chartqa" / "test", data_dir / "test")
        shutil.copytree(FIXTURES / "chartqa" / "test", data_dir / "train")
        (data_dir / "train" / "test_human.json").rename(data_dir / "train" / "train_human.json")
        (data_dir / "train" / "test_augmented.json").rename(data_dir / "train" / "train_augmented.json")
    elif task == "clevr-math":
        shutil.copytree(FIXTURES / "clevr_math" / "r3v", data_dir)
        shutil.copy(data_dir / "clevr_test.json", data_dir / "clevr_train.json")
    else:
        shutil.copytree(FIXTURES / "geoqa" / "geoQA-data", data_dir)


def warmup_file(config, path: Path) -> None:
    """Two records in R3V's warm-up JSON format naming images of the recipe's image root."""
    images = sorted(p.name for p in Path(config.warmup.image_root).glob("*.png"))[:2]
    records = [{"image": name, "conversations": [
        {"from": "user", "value": "<image>\nHow many things are shown?\nLet's think step by step."},
        {"from": "assistant", "value": "Solution:\n1. Count them: there are 2.\n\nAnswer:\n2"}]} for name in images]
    path.write_text(json.dumps(records))


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_runs_one_iteration_on_a_tiny_model(name, tmp_path, monkeypatch, r3v_cache):
    family = next(f for f in TINY if name.startswith(f))
    config = resolve_config(recipe(name))
    monkeypatch.chdir(tmp_path)  # the recipe's relative data paths resolve here
    lay_out(config.task.name, Path(config.task.data_dir))
    if config.warmup.file:
        warmup_file(config, Path(config.warmup.file))
    overrides = [
        f"model={TINY[family]}", "backend.name=hf", "iterations=1", "task.train_limit=3", "task.test_limit=2",
        "sampling.max_new_tokens=6", "eval.max_new_tokens=6", "eval.samples=2", "train.epochs=1",
        "train.global_batch=4", "train.batch_size=2", "train.gradient_checkpointing=false",
        "train.trust_remote_code=false", "backend.trust_remote_code=false",
    ]
    if family == "qwen-vl-chat":  # Qwen-VL's module names: the stand-in's language model instead
        overrides.append("train.lora_target=.*language_model.*\\.(q_proj|v_proj)")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(config_file(f"reference/{name}")), "--out", str(out),
                                       *overrides], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [0, 1]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["reference"] and settings["eval_select"] == {"skip_when_agree": False, "unparseable": "wrong"}
    assert settings["task_args"]["prompts"] == "reference"
    assert settings["train"]["lora_r"] == {"qwen-vl-chat": 64, "llava-1.5-7b": 128, "qwen2-vl-7b": 8}[family]
    # with the skip off, self-select called the model for every test question
    assert rows[1]["select_how"]["skipped"] == 0 and sum(rows[1]["select_how"].values()) == 2
    assert (rows[0]["train_steps"] == 0) == (family == "qwen2-vl-7b")  # reference B starts from the base model
