"""Run settings: one tree of dataclasses, read from YAML files, flags and KEY=VALUE overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from r3v.cli import main
from r3v.config import (
    SHIPPED_CONFIGS,
    LoopConfig,
    TrainConfig,
    config_file,
    from_mapping,
    nested,
    parse_override,
    to_mapping,
)
from r3v.demo.grid_base import SETTINGS as GRID_BASE_SETTINGS
from r3v.loop import resolve_config, run_settings
from r3v.models.loading import resolve_model
from r3v.models.presets import MODEL_SETTINGS_FILE, named_preset
from r3v.records import Sampling


def test_the_demo_config_is_what_r3v_train_runs_with_no_options():
    assert resolve_config(yaml.safe_load(config_file("demo").read_text())) == resolve_config()
    demo = resolve_config()
    assert (demo.model, demo.task.name, demo.iterations, demo.sampling.n) == ("r3v-grid-base", "grid-count", 3, 3)
    # the built-in model's folder recommends its own limit, preset and (chosen on the dev datasets)
    # rate schedule and self-select sets (r3v/assets/r3v-grid-base/r3v.json)
    assert (demo.sampling.max_new_tokens, demo.train_preset, demo.train) == (160, "tiny", {"lr_scheduler": "cosine"})
    assert (demo.build.select_sizes, demo.build.select_sizes_per_question) == ((2, 3, 4, 5, 6), 1)
    # the shipped folder says what a rebuild would write
    shipped = Path(resolve_model("r3v-grid-base")) / MODEL_SETTINGS_FILE
    assert json.loads(shipped.read_text()) == GRID_BASE_SETTINGS
    assert demo.train_config(named_preset(demo.train_preset)).lr_scheduler == "cosine"
    # clevr-synth's base recommends its own self-select sets, also chosen on dev datasets
    clevr = resolve_config({"model": "r3v-clevr-base", "task": {"name": "clevr-synth"}})
    assert (clevr.build.select_sizes, clevr.build.select_sizes_per_question, clevr.sampling.max_new_tokens) == (
        (2, 3, 4, 5, 6), 1, 64)
    # a recommendation, not a default: other models train R3V's sets of 3
    assert resolve_config({"model": "Qwen/Qwen2-VL-7B-Instruct"}).build.select_sizes == (3,)
    assert resolve_config({"model": "Qwen/Qwen2-VL-7B-Instruct"}).build.select_sizes_per_question == 0
    assert resolve_config({"model": "Qwen/Qwen2-VL-7B-Instruct"}).sampling.max_new_tokens == 384


def test_every_shipped_config_reads():
    files = [p for p in SHIPPED_CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts]
    assert len(files) >= 8
    for path in files:
        config = resolve_config(yaml.safe_load(path.read_text()))
        preset = named_preset(config.train_preset, config.model) if config.train_preset != "auto" else None
        assert preset is not None  # every shipped config names its trainer preset, or its model does
        if "reference" in path.parts:
            assert config.train_config(preset).lora  # every reference recipe trains LoRA adapters
    geoqa = resolve_config(yaml.safe_load(config_file("reference/qwen2-vl-7b-geoqa").read_text()))
    assert (geoqa.sampling.max_new_tokens, geoqa.warmup.skip_training, geoqa.backend.name) == (200, True, "vllm")


def test_sections_start_from_the_loops_defaults_and_layers_apply_in_order():
    config = from_mapping(LoopConfig, {"sampling": {"max_new_tokens": 10}, "build": {"method": "star"}})
    assert config.sampling == Sampling(n=3, max_new_tokens=10)  # n stays the loop's 3, not Sampling's 1
    assert (config.build.self_cot, config.build.self_refine, config.build.self_select) == (True, False, False)
    layered = resolve_config({"iterations": 5, "train": {"epochs": 1}}, {"iterations": 2},
                             nested(*parse_override("train.learning_rate=1e-4")))
    # the built-in model's recommendation (a cosine decay) is kept beside the layers' keys
    assert layered.iterations == 2 and layered.train == {"lr_scheduler": "cosine", "epochs": 1, "learning_rate": 1e-4}
    assert parse_override("build.select_sizes=[2,3,4]") == (["build", "select_sizes"], [2, 3, 4])
    assert parse_override("task.args.judge=r3v") == (["task", "args", "judge"], "r3v")
    # overrides of the trainer preset; an explicit accumulation drops the preset's global batch
    trained = resolve_config({"train": {"grad_accum": 4}}).train_config(named_preset("qwen2-vl"))
    assert (trained.grad_accum, trained.global_batch, trained.lora_r) == (4, None, 8)


def test_unknown_settings_are_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"task\.nmae; known here: name, data_dir"):
        from_mapping(LoopConfig, {"task": {"nmae": "x"}})
    with pytest.raises(ValueError, match="unknown train setting"):
        from_mapping(LoopConfig, {"train": {"learning_rat": 1.0}})
    with pytest.raises(ValueError, match="unknown method"):
        from_mapping(LoopConfig, {"build": {"method": "dpo"}})
    with pytest.raises(ValueError, match="not a file, nor one r3v ships"):
        config_file("nope")
    result = CliRunner().invoke(main, ["train", "tsk.name=x"])
    assert result.exit_code == 2 and "unknown setting(s) tsk" in result.output


def test_the_config_round_trips_and_keeps_run_settings_stable():
    config = resolve_config({"model": "r3v-clevr-base", "task": {"name": "clevr-synth", "args": {"seed": 1}},
                             "eval": {"samples": 5}})
    assert from_mapping(LoopConfig, to_mapping(config)) == config
    settings = run_settings(config, config.train_config(named_preset("tiny")))
    # run.json's settings keep the flat shape earlier runs wrote, so they continue after an upgrade
    assert list(settings) == ["model", "task", "task_args", "skip_bad", "allow_outside_paths", "build", "train",
                              "from_base", "train_limit", "test_limit", "data_dir", "warmup_file", "image_root",
                              "teacher_count", "skip_warmup_train", "sampling", "eval_samples",
                              "eval_max_new_tokens", "eval_select", "chunk_size", "seed", "backend", "reference"]
    assert settings["task_args"] == {"seed": 1} and settings["eval_samples"] == 5
    assert settings["train"] == json.loads(json.dumps(dataclasses.asdict(named_preset("tiny")), default=str))


def test_every_flag_of_r3v_train_names_a_real_setting():
    """Each flag is a shortcut for one key of the tree: a renamed field would break it here."""
    from r3v.cli.train import FLAG_KEYS

    paths = {key for _, key in FLAG_KEYS}
    tree = to_mapping(LoopConfig())
    trainer_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in paths:
        head, *rest = key.split(".")
        assert head in tree, key
        if head == "train":
            assert rest[0] in trainer_fields, key
        elif rest:
            assert rest[0] in tree[head], key


def test_task_options_are_recorded_as_the_task_types_them():
    from r3v.tasks.base import build_task, given_options

    as_text, typed = {"test_size": "7", "sizes": '{"train": 5}'}, {"test_size": 7, "sizes": {"train": 5}}
    recorded = [given_options(build_task("clevr-synth", given), given) for given in (as_text, typed)]
    assert recorded[0] == recorded[1] == {"test_size": 7, "sizes": {"train": 5}}
