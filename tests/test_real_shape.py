"""Real-shape models, the chart data and the real-shape benchmark's pieces.

The public configs are checked at full size on the ``meta`` device (parameter counts, no memory);
the builder is checked end to end on reduced copies of the same configs: the same classes,
tokenizer, special-token ids and vocabulary size, with tiny hidden sizes, so a build takes a second.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3v.models.real_shape import (
    ALIASES,
    MARKER,
    RealShapeError,
    build_real_shape_model,
    config_path,
    hf_config,
    load_spec,
    parameter_counts,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import chart_data  # noqa: E402
import real_shape as bench  # noqa: E402

# The public ids of Qwen2-VL's tokenizer (tokenizer_config.json, added_tokens_decoder).
PUBLIC_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
              "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def reduced_config(name: str, out: Path) -> Path:
    """A shipped config with tiny sizes: same model type, token ids and vocabulary size."""
    data = json.loads(config_path(name).read_text())
    data.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_window_layers=2)
    # head_dim 16: M-RoPE's three sections must sum to head_dim / 2
    data["rope_scaling"] = {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}
    vision = dict(data["vision_config"])
    if data["model_type"] == "qwen2_vl":
        vision.update(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    data["vision_config"] = vision
    out.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(config file, built folder) of a reduced Qwen2-VL and Qwen2.5-VL, float32."""
    root = tmp_path_factory.mktemp("real-shape")
    built = {}
    for name in ("qwen2-vl-2b", "qwen2.5-vl-7b"):
        config = reduced_config(name, root / f"{name}-reduced.json")
        built[name] = (config, build_real_shape_model(config, root / name, seed=0, dtype="float32"))
    return built


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> Path:
    return chart_data.write_chart_dataset(tmp_path_factory.mktemp("charts") / "data", train_charts=3, test_charts=2)


# ---------------------------------------------------------------- public configs
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_shipped_configs_carry_their_source_and_the_public_ids(name):
    spec = load_spec(name)
    raw = json.loads(config_path(name).read_text())
    assert raw["_source"]["values_from"].startswith("https://huggingface.co/")
    assert "_source" not in spec.values and "_special_tokens" not in spec.values
    assert {t: spec.special_tokens[t] for t in PUBLIC_IDS} == PUBLIC_IDS
    assert spec.preprocessor["min_pixels"] == 3136 and spec.preprocessor["max_pixels"] == 12845056
    assert (spec.preprocessor["patch_size"], spec.preprocessor["merge_size"], spec.preprocessor["temporal_patch_size"]) \
        == (14, 2, 2)
    config = hf_config(spec)
    assert config.image_token_id == 151655 and config.vision_start_token_id == 151652
    text = config.text_config
    assert text.vocab_size == {"qwen2-vl-2b": 151936}.get(name, 152064)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim == 128


@pytest.mark.parametrize(
    ("name", "total", "language", "vision"),
    [("qwen2-vl-2b", 2.21e9, 1.54e9, 0.67e9), ("qwen2-vl-7b", 8.29e9, 7.6e9, 0.67e9), ("qwen2.5-vl-7b", 8.29e9, 7.6e9, 0.67e9)],
)
def test_parameter_counts_match_the_public_figures(name, total, language, vision):
    counts = parameter_counts(name)  # built on the meta device: no weights allocated
    assert counts["total"] == counts["language_model"] + counts["vision"]
    assert counts["total"] == pytest.approx(total, rel=0.02)
    assert counts["language_model"] == pytest.approx(language, rel=0.03)
    assert counts["vision"] == pytest.approx(vision, rel=0.03)
    # the 2B ties lm_head to the embeddings; the 7Bs do not
    assert (counts["lm_head"] == 0) == (name == "qwen2-vl-2b")


def test_bad_configs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(RealShapeError, match="unknown real-shape config"):
        load_spec("qwen2-vl-3b")
    data = json.loads(config_path("qwen2-vl-2b").read_text())
    data["image_token_id"] = 151654
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(RealShapeError, match="image_token_id"):
        build_real_shape_model(bad, tmp_path / "model")
    with pytest.raises(RealShapeError, match="dtype"):
        build_real_shape_model("qwen2-vl-2b", tmp_path / "model", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing half-written


# ---------------------------------------------------------------- the builder
@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2.5-vl-7b"])
def test_reduced_build_loads_and_generates_through_r3v(reduced, name, charts):
    from PIL import Image

    from r3v.backends.hf import HFBackend
    from r3v.models.loading import load_model
    from r3v.records import Request, Sampling

    config_file, folder = reduced[name]
    spec = load_spec(config_file)
    loaded = load_model(str(folder))
    assert type(loaded.model).__name__ == {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[spec.model_type]
    tokenizer = loaded.processor.tokenizer
    assert len(tokenizer) == spec.vocab_size == loaded.model.config.text_config.vocab_size
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in spec.special_tokens} == spec.special_tokens
    marker = json.loads((folder / MARKER).read_text())
    assert marker["config_sha256"] == spec.sha256 and marker["seed"] == 0 and marker["dtype"] == "float32"

    image = Image.open(charts / "train" / "png" / "chart_0000.png").convert("RGB")
    request = Request.user("What is the value of Apples?", [image])
    text = loaded.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    inputs = loaded.processor(text=[text], images=[image], return_tensors="pt")
    # an 800x600 chart under the public 12.8M-pixel cap: 42x58 patches of 14 px, merged 2x2
    assert inputs["image_grid_thw"].tolist() == [[1, 42, 58]]
    assert int((inputs["input_ids"] == spec.special_tokens["<|image_pad|>"]).sum()) == 42 * 58 // 4
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[-1] == spec.vocab_size and torch.isfinite(logits).all()

    backend = HFBackend(model=str(folder), loaded=loaded)
    completions = backend.generate([request], Sampling(n=2, max_new_tokens=4, seed=0))[0]
    assert len(completions) == 2
    assert all(1 <= c.completion_tokens <= 4 and c.prompt_tokens == inputs["input_ids"].shape[1] for c in completions)


def test_tokenizer_round_trips_text_and_decodes_every_id(reduced):
    from transformers import AutoTokenizer

    _, folder = reduced["qwen2-vl-2b"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Shops is 22 and Services is 32. 22 + 32 = 54.\nAnswer: 54"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # ordinary text never produces filler or special ids
    assert max(ids) < min(PUBLIC_IDS.values())
    assert tokenizer.decode([151900]) == "<|r3v_filler_151900|>"
    assert tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][0] == 151644


def test_build_is_seeded_replaces_the_folder_and_writes_the_asked_dtype(reduced, tmp_path):
    from safetensors.torch import load_file

    config_file, first = reduced["qwen2-vl-2b"]
    again = build_real_shape_model(config_file, tmp_path / "same", seed=0, dtype="float32")
    other = build_real_shape_model(config_file, tmp_path / "other", seed=1, dtype="float32")
    weights = [load_file(folder / "model.safetensors") for folder in (first, again, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    # random, as initialised by transformers (std = initializer_range), not left empty
    up = next(v for k, v in weights[0].items() if k.endswith("layers.0.mlp.up_proj.weight"))
    assert up.std().item() == pytest.approx(0.02, rel=0.2)

    # bfloat16 into the existing folder: it is replaced, and every tensor is bf16 (the hub's torch_dtype
    # sits in text_config too; a build that ignored it would leave the language model in another dtype)
    (tmp_path / "same" / "stale.txt").write_text("from the first build")
    rebuilt = build_real_shape_model(config_file, tmp_path / "same", seed=0, dtype="bfloat16")
    assert not (rebuilt / "stale.txt").exists()
    assert _safetensors_dtypes(rebuilt) == {"BF16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "same"]  # no temporary folders left


def _safetensors_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


# ---------------------------------------------------------------- chart data
def test_charts_load_through_the_chartqa_task_with_exact_labels(charts, tmp_path):
    from PIL import Image

    from r3v.tasks.chartqa import ChartQA

    task = ChartQA(hf_dataset="")
    train, test = task.load("train", data_dir=charts), task.load("test", data_dir=charts)
    assert (len(train), len(test)) == (6, 4)
    tables = json.loads((charts / "train" / "tables.json").read_text())
    for example in train:
        image = Image.open(example.images[0])
        assert image.size == (800, 600)
        table = tables[example.metadata["imgname"]]
        assert _answer_from_table(example.question, table) == example.answer
        assert task.is_correct(task.extract(f"Answer: {example.answer}", example), example)
    # same settings: reused as is; another seed: other charts
    before = (charts / "train" / "train_human.json").stat().st_mtime_ns
    chart_data.write_chart_dataset(charts, train_charts=3, test_charts=2)
    assert (charts / "train" / "train_human.json").stat().st_mtime_ns == before
    other = chart_data.write_chart_dataset(tmp_path / "other", train_charts=3, test_charts=2, seed=1)
    assert (other / "train" / "train_human.json").read_text() != (charts / "train" / "train_human.json").read_text()


def _answer_from_table(question: str, table: dict) -> str:
    """Each question form's answer, recomputed from the chart's table."""
    value = dict(zip(table["categories"], table["values"], strict=True))
    named = [c for c in table["categories"] if c in question]
    if "highest" in question:
        return max(value, key=value.get)
    if "lowest" in question:
        return min(value, key=value.get)
    if "sum of" in question:
        return str(sum(value[c] for c in named))
    if "change from" in question:
        return str(table["values"][-1] - table["values"][0])
    if "difference" in question:
        a, b = named
        return str(abs(value[a] - value[b]))
    (only,) = named
    return str(value[only])


def test_warmup_file_is_read_by_r3v_as_correct_worked_solutions(charts):
    from r3v.tasks.chartqa import ChartQA
    from r3v.warmup import read_warmup_file

    task = ChartQA(hf_dataset="")
    examples = {ex.id: ex for ex in task.load("train", data_dir=charts, limit=4)}
    path = chart_data.write_warmup(charts, limit=4)
    items = read_warmup_file(path, examples, task_name="chartqa")
    assert [item.example_id for item in items] == list(examples)
    for item in items:
        example = examples[item.example_id]
        assert item.prompt == task.cot_prompt(example)
        assert task.is_correct(task.extract(item.target, example), example)


def test_chartqa_from_a_local_folder_needs_no_datasets(charts):
    # the GPU machine has no `datasets`: block its import and take the run's import path
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import r3v.cli.train, r3v.loop, r3v.warmup\n"
        "from r3v.tasks.chartqa import ChartQA\n"
        f"print(len(ChartQA().load('test', data_dir={str(charts)!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


# ---------------------------------------------------------------- the benchmark script
def test_visual_tokens_are_counted_at_the_pixel_cap(reduced, charts):
    _, folder = reduced["qwen2-vl-2b"]
    images = sorted((charts / "train" / "png").glob("*.png"))
    uncapped = bench.visual_tokens(folder, images, 12845056)
    assert (uncapped["min"], uncapped["max"], uncapped["images"]) == (609, 609, 3)  # 42 x 58 patches / 4
    capped = bench.visual_tokens(folder, images, 400 * 400)
    assert capped["max"] * 28 * 28 <= 400 * 400 and capped["max"] < uncapped["min"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as the loop leaves it: resources.json (fabricated, in the loop's documented shape,
    with evaluation's tokens/s left out and no loading record) and metrics.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    phase = {"seconds": 12.5, "tokens": 4000, "tokens_per_second": 320.0, "peak_rss_mib": 9876.5,
             "cuda_max_allocated_mib": None, "cuda_max_reserved_mib": None}
    resources = {"iterations": {"1": {"sampling": phase, "building": {**phase, "tokens": 0, "tokens_per_second": 0.0},
                                      "training": {**phase, "seconds": 250.0, "tokens": 3000, "tokens_per_second": 12.0,
                                                   "peak_rss_mib": 14210.0},
                                      "evaluation": {**phase, "tokens_per_second": None}}},
                 "device": "cpu"}
    (run / "resources.json").write_text(json.dumps(resources))
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "items": {"cot": 8, "qa": 8},
                                                   "train_losses": {"sft": 11.9}}) + "\n")
    return run


def test_results_file_carries_what_the_run_recorded(run_dir, tmp_path):
    args = bench.parse_args(["--model", "qwen2-vl-2b", "--work", str(tmp_path)])
    paths = {**bench.work_paths(args), "run": run_dir}
    command = bench.train_command(args, paths, None)
    record = bench.build_results(args, paths, command, machine={"cores": 2}, parameters={"total": 1},
                                 build={"reused": True}, tokens={"mean": 609}, data={}, run={"returncode": 0})
    assert record["device"] == "cpu" and record["command_line"].split()[2:4] == ["r3v.cli", "train"]
    assert record["phases"]["1"]["training"]["tokens_per_second"] == 12.0
    assert record["phases"]["1"]["evaluation"]["tokens_per_second"] == 320.0  # 4000 tokens / 12.5 s
    assert record["phases_missing"] == ["loading"]
    assert record["peaks"]["peak_rss_mib"] == {"value": 14210.0, "phase": "1/training"}
    assert record["peaks"]["cuda_max_allocated_mib"] == {"value": None, "phase": None}
    assert record["iterations"]["1"]["items"] == {"cot": 8, "qa": 8}
    assert record["config_source"].startswith("https://huggingface.co/")
    (run_dir / "resources.json").unlink()
    with pytest.raises(bench.ResultsError, match="resources.json is missing"):
        bench.build_results(args, paths, command, machine={}, parameters={}, build={}, tokens={}, data={}, run={})


def test_dry_run_prints_the_command_with_every_limit_and_builds_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    assert bench.main(["--model", "qwen2-vl-2b", "--dry-run", "--work", str(work), "--train-limit", "6",
                       "--gradient-checkpointing", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[0].split()
    assert line[:5] == [sys.executable, "-m", "r3v.cli", "train", "--iterations"]
    pairs = dict(zip(line, line[1:], strict=False))
    assert pairs["--train-limit"] == "6" and pairs["--test-limit"] == "4" and pairs["--max-new-tokens"] == "32"
    assert pairs["--samples-per-iteration"] == "3" and pairs["--eval-samples"] == "3" and pairs["--epochs"] == "1"
    assert pairs["--lora-r"] == "8" and pairs["--lora-alpha"] == "16" and pairs["--max-pixels"] == str(768 * 768)
    assert pairs["--batch-size"] == "2" and "--gradient-checkpointing" in line and "--skip-warmup-train" in line
    assert pairs["--warmup-file"].endswith("warmup_6.jsonl")
    assert not work.exists()
    assert bench.unknown_flags([*line, "--no-such-flag", "1"]) == ["--no-such-flag"]


def test_vllm_missing_is_recorded_not_run(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    results = tmp_path / "vllm.json"
    assert bench.main(["--model", "qwen2-vl-7b", "--backend", "vllm", "--work", str(tmp_path / "w"),
                       "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    assert record["status"] == "not installed" and record["backend"] == "vllm"
    assert "--backend vllm" in record["command_line"] and not (tmp_path / "w").exists()
    assert record["machine"]["cores"] >= 1
