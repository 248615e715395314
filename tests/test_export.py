"""`r3v export --merge`: a LoRA adapter merged into a full checkpoint gives the adapter's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from r3v.cli import main
from r3v.errors import DataError

# LLM and vision-tower layers both: a merged checkpoint must keep the vision part too.
TARGETS = r".*(language_model.*\.(q_proj|v_proj|down_proj)|visual.*\.(qkv|fc1))"


@pytest.fixture(scope="module")
def perturbed_adapter(tiny_qwen, tmp_path_factory) -> Path:
    """A real PEFT adapter on tiny-qwen2-vl whose B matrices are not zero, so it changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: an identity adapter
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("export") / "adapter"
    peft_model.save_pretrained(out)
    return out


def _logits(loaded, clevr_task):
    import torch

    from r3v.models.batching import collate, encode

    example = clevr_task.load("test", limit=1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": clevr_task.cot_prompt(example)}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = collate([encode(loaded.processor, text, example.load_images())], loaded.processor.tokenizer.pad_token_id, "left")
    with torch.inference_mode():
        return loaded.model(**batch).logits


def test_merged_checkpoint_reproduces_base_plus_adapter(tiny_qwen, perturbed_adapter, clevr_task, tmp_path):
    from r3v.models.loading import load_model

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, [
        "export", "--merge", "--model", "tiny-qwen2-vl", "--adapter", str(perturbed_adapter), "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "r3v_merge.json").read_text())["dtype"] == "float32"

    merged = load_model(str(out), device="cpu", dtype="float32")
    with_adapter = load_model("tiny-qwen2-vl", adapter=str(perturbed_adapter), device="cpu", dtype="float32")
    base = load_model("tiny-qwen2-vl", device="cpu", dtype="float32")
    merged_logits = _logits(merged, clevr_task)
    adapter_logits = _logits(with_adapter, clevr_task)
    base_logits = _logits(base, clevr_task)
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-5
    assert (adapter_logits - base_logits).abs().max().item() > 1e-3  # the adapter is not a no-op

    # the vision tower's LoRA was merged too (vLLM would have dropped it)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as merged_file, \
            safe_open(Path(tiny_qwen) / "model.safetensors", "pt") as base_file:
        key = next(k for k in merged_file.keys() if k.endswith("visual.blocks.0.attn.qkv.weight"))
        assert not merged_file.get_tensor(key).equal(base_file.get_tensor(key))


def test_merge_keeps_the_requested_dtype(perturbed_adapter, tmp_path):
    import torch

    from r3v.integrations.merge import merge_adapter
    from r3v.models.loading import load_model

    out = merge_adapter("tiny-qwen2-vl", str(perturbed_adapter), tmp_path / "bf16", dtype="bfloat16")
    loaded = load_model(str(out), device="cpu", dtype="auto")
    assert json.loads((out / "r3v_merge.json").read_text())["dtype"] == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.float32  # load_model's CPU default
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}


def test_merge_refuses_bad_inputs(perturbed_adapter, tmp_path):
    from r3v.integrations.merge import merge_adapter

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        merge_adapter("tiny-qwen2-vl", str(perturbed_adapter), taken)
    assert (taken / "keep.txt").exists()
    with pytest.raises(DataError, match="adapter_config.json"):
        merge_adapter("tiny-qwen2-vl", str(tmp_path), tmp_path / "out")

    result = CliRunner().invoke(main, ["export", "--merge", "--adapter", str(perturbed_adapter)])
    assert result.exit_code != 0 and "--out" in result.output
    result = CliRunner().invoke(main, ["export"])
    assert result.exit_code != 0 and "nothing to export" in result.output
