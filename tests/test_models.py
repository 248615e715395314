"""Tiny offline models: built with real HF classes, saved, and reloaded through the hub loader."""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from r3v.backends.hf import HFBackend
from r3v.models.loading import load_model
from r3v.models.tiny import build_tiny_model
from r3v.records import Request


@pytest.mark.parametrize(
    ("name", "cls"), [("tiny-qwen2-vl", Qwen2VLForConditionalGeneration), ("tiny-llava", LlavaForConditionalGeneration)]
)
def test_tiny_models_load_through_the_path_loader(name, cls, request):
    path = request.getfixturevalue("tiny_qwen" if "qwen" in name else "tiny_llava")
    loaded = load_model(path)
    assert isinstance(loaded.model, cls)
    assert loaded.device == "cpu" and loaded.dtype == torch.float32
    # The chat template is the processor's own, and the image placeholder expands to image tokens.
    text = loaded.processor.apply_chat_template(
        Request.user("How many?", [object()]).messages, add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert json.loads((Path(path) / "r3v_tiny.json").read_text())["name"] == name


def test_build_is_deterministic_for_a_seed(tmp_path):
    first = build_tiny_model("tiny-qwen2-vl", tmp_path / "a", seed=3)
    second = build_tiny_model("tiny-qwen2-vl", tmp_path / "b", seed=3)
    other = build_tiny_model("tiny-qwen2-vl", tmp_path / "c", seed=4)
    weights = [AutoModelForImageTextToText.from_pretrained(p).state_dict() for p in (first, second, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_save_and_load_round_trip_keeps_logits(tmp_path, tiny_qwen, clevr_task):
    loaded = load_model(tiny_qwen)
    loaded.model.save_pretrained(tmp_path / "copy")
    loaded.processor.save_pretrained(tmp_path / "copy")
    again = load_model(str(tmp_path / "copy"))
    example = clevr_task.load("test", limit=1)[0]
    text = loaded.processor.apply_chat_template(
        Request.user(clevr_task.cot_prompt(example), example.load_images()).messages,
        add_generation_prompt=True, tokenize=False,
    )
    inputs = loaded.processor(text=[text], images=example.load_images(), return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, again.model(**inputs).logits, atol=1e-6)


def test_adapter_loading_changes_outputs_and_applies_to_the_language_model(tmp_path, tiny_qwen, clevr_task):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_qwen).model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    plain = HFBackend(model=tiny_qwen)
    adapted = HFBackend(model=tiny_qwen, adapter=str(tmp_path / "adapter"))
    example = clevr_task.load("test", limit=1)[0]
    text = plain.prompt_text(Request.user(clevr_task.cot_prompt(example), example.load_images()))
    inputs = plain.processor(text=[text], images=example.load_images(), return_tensors="pt")
    with torch.no_grad():
        delta = (plain.loaded.model(**inputs).logits - adapted.loaded.model(**inputs).logits).abs().max()
    assert delta > 1e-3
    names = [n for n, _ in adapted.loaded.model.named_parameters() if "lora_" in n]
    assert names and all("language_model" in n for n in names)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava"])
def test_processor_is_multimodal_and_expands_image_tokens(name, r3v_cache, clevr_task):
    """AutoProcessor can silently fall back to a bare tokenizer; the loader must not accept that."""
    from r3v.models.batching import encode

    loaded = load_model(name)
    example = clevr_task.load("test", limit=1)[0]
    text = loaded.processor.apply_chat_template(
        Request.user("How many?", [object()]).messages, add_generation_prompt=True, tokenize=False
    )
    encoded = encode(loaded.processor, text, example.load_images())
    image_token = loaded.model.config.image_token_id
    assert int((encoded["input_ids"] == image_token).sum()) == 16
    assert "pixel_values" in encoded
    if name == "tiny-qwen2-vl":
        assert {"image_grid_thw", "mm_token_type_ids"} <= encoded.keys()


def test_the_shipped_base_model_reads_the_image(clevr_task):
    """The built-in base model's counts depend on the image it is shown: on train scenes (not seen
    in its warm-up) the true count descriptions are much likelier under their own image than under
    another question's image."""
    import random

    from r3v.demo.corpus import describe_counts
    from r3v.models.loading import resolve_model
    from r3v.records import TrainItem
    from r3v.train.data import CompletionCollator, ItemDataset

    lm = load_model(resolve_model("r3v-clevr-base"))
    examples = clevr_task.load("train", limit=48)
    descriptions = [describe_counts(clevr_task.scene("train", i), random.Random(i)) for i in range(len(examples))]

    def loss(shift: int) -> float:
        items = [
            TrainItem("distill", ex.id, request, answer, images=[examples[(i + shift) % len(examples)].images[0]])
            for i, (ex, (request, answer)) in enumerate(zip(examples, descriptions, strict=True))
        ]
        dataset = ItemDataset(lm.processor, items, {}, max_length=1024)
        batch = CompletionCollator(lm.processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        batch.pop("objective")
        with torch.no_grad():
            return float(lm.model(**batch).loss)

    own, other = loss(0), loss(7)
    assert own < 0.85 * other, (own, other)


def test_arithmetic_warmup_items_are_text_only_true_sums_in_the_rationale_wording():
    import random

    from r3v.builders import equations_hold
    from r3v.demo.base_model import arithmetic_items

    items = arithmetic_items(200, random.Random(0))
    assert items == arithmetic_items(200, random.Random(0))  # seeded
    assert all(item.images == [] and item.kind == "distill" for item in items)
    assert all(equations_hold(item.target) for item in items)
    operators = {item.target.split()[1] for item in items}
    assert operators == {"+", "-"}
    # the operands the clevr-synth rationales use: counts up to 8, additions of 1 to 3
    for item in items:
        a, op, b = item.target.split()[:3]
        assert 0 <= int(b) <= int(a) <= 8 if op == "-" else (0 <= int(a) <= 8 and 1 <= int(b) <= 3)
        assert item.prompt == f"What is {a} {op} {b}?"


def test_the_shipped_grid_base_reads_each_row_of_the_image():
    """r3v-grid-base, asked to describe a row of train scenes it never saw (its perception stage used
    the pretrain split), writes the row's cells as the rendering placed them, and the true
    descriptions are much likelier under their own image than under another question's."""
    import random

    from r3v.demo.grid_base import describe_row
    from r3v.models.loading import resolve_model
    from r3v.records import TrainItem
    from r3v.tasks.grid_count import GridCount
    from r3v.train.data import CompletionCollator, ItemDataset

    task = GridCount()
    examples = task.load("train", limit=24)
    rng = random.Random(0)
    described = [describe_row(task.scene("train", i), rng.randint(1, 4)) for i in range(len(examples))]
    lm = load_model(resolve_model("r3v-grid-base"))
    tokenizer = lm.processor.tokenizer
    read_right = 0
    for example, (request, answer) in zip(examples[:12], described, strict=False):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request}]}]
        prompt = lm.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = lm.processor(text=[prompt], images=example.load_images(), return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=32, do_sample=False)
        read_right += tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer
    assert read_right >= 9, read_right

    def loss(shift: int) -> float:
        items = [
            TrainItem("distill", ex.id, request, answer, images=[examples[(i + shift) % len(examples)].images[0]])
            for i, (ex, (request, answer)) in enumerate(zip(examples, described, strict=True))
        ]
        dataset = ItemDataset(lm.processor, items, {}, max_length=1024)
        batch = CompletionCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        batch.pop("objective")
        with torch.no_grad():
            return float(lm.model(**batch).loss)

    assert loss(0) < 0.5 * loss(7)


def test_the_shipped_grid_base_marks_each_object_for_the_question():
    """r3v-grid-base, asked grid-count's chain-of-thought prompt about train scenes it never saw,
    writes rationales whose rows it reads, marks (each object "yes" exactly when the question asks
    about it) and counts right, judged step by step from the scene (``step_outcomes``), far above
    what always writing the commonest row count scores; its answers are often right already, but
    not always: the loop has room to improve them."""
    from collections import Counter

    from r3v.backends.hf import HFBackend
    from r3v.records import Request, Sampling
    from r3v.tasks.grid_count import GridCount

    task = GridCount()
    examples = task.load("train", limit=16)
    backend = HFBackend(model="r3v-grid-base")
    requests = [Request.user(task.cot_prompt(ex), ex.load_images()) for ex in examples]
    texts = [group[0].text for group in backend.generate(requests, Sampling(greedy=True, max_new_tokens=160))]
    steps = [step for text, ex in zip(texts, examples, strict=True) for step in task.step_outcomes(text, ex)]
    assert len(steps) >= 4 * len(examples) - 2  # every rationale walks the four rows

    def share(part: str) -> float:
        return sum(getattr(step, part) for step in steps) / len(steps)

    assert share("read") >= 0.8 and share("marked") >= 0.9 and share("counted") >= 0.9, [share(p) for p in ("read", "marked", "counted")]
    # a step read, marked and counted right writes the row's true count: far more often than a
    # constant count would be right (the bar the unmarked base did not clear)
    commonest = Counter(step.right_count for step in steps).most_common(1)[0][1] / len(steps)
    assert sum(step.read and step.marked and step.counted for step in steps) / len(steps) > commonest + 0.2
    right = sum(task.is_correct(task.extract(text, ex), ex) for text, ex in zip(texts, examples, strict=True))
    assert 0 < right < len(examples)


def test_the_shipped_grid_base_marks_rows_of_unseen_scenes_given_as_text():
    """Stage 2 of r3v-grid-base's recipe, checked on train scenes (it trained on pretrain ones): a
    question and one row's cells in, the row with each object marked and the number of marks out.
    The expected text is written here from the scene, not by the recipe's own helper."""
    import random
    import re

    from r3v.backends.hf import HFBackend
    from r3v.records import Request, Sampling
    from r3v.tasks.grid_count import GridCount

    task = GridCount()
    rng = random.Random(3)
    requests, expected = [], []
    for index in range(40):
        question = task.example("train", index).question
        color, noun = re.fullmatch(r"How many (?:(\w+) )?(objects|squares|circles) are there\?", question).groups()
        row = rng.randrange(4)
        held = {cell: (c, shape) for cell, c, shape in task.scene("train", index).objects}
        cells = [held.get(row * 4 + col) for col in range(4)]
        plain = ", ".join("empty" if cell is None else " ".join(cell) for cell in cells)
        marks = [None if cell is None else (color in (None, cell[0]) and noun in ("objects", f"{cell[1]}s"))
                 for cell in cells]
        written = ", ".join("empty" if cell is None else f"{' '.join(cell)} {'yes' if asked else 'no'}"
                            for cell, asked in zip(cells, marks, strict=True))
        requests.append(Request.user(f"{question}\nRow {row + 1}: {plain}"))
        expected.append(f"{written}; {sum(bool(asked) for asked in marks)}")
    backend = HFBackend(model="r3v-grid-base")
    got = [group[0].text.strip() for group in backend.generate(requests, Sampling(greedy=True, max_new_tokens=40))]
    exact = sum(a == b for a, b in zip(got, expected, strict=True))
    assert exact >= 36, exact
    assert any(text.endswith("; 0") for text in expected) and any("yes" in text for text in expected)
