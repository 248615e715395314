"""The training collator on the tiny models: completion-only labels, multimodal inputs, truncation."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch

from r3v.errors import DataError
from r3v.models.batching import SEQUENCE_KEYS, collate, concat_rows, encode
from r3v.models.loading import load_model
from r3v.models.shared_images import IMAGE_SET_KEY
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import OBJECTIVES, Request, TrainItem
from r3v.train.data import (
    PADDING_KEY,
    CompletionCollator,
    ItemDataset,
    StepSampler,
    encode_item,
    end_of_turn,
)

MODELS = ["tiny_qwen", "tiny_llava"]


@pytest.fixture(scope="module")
def loaded(request):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(request.getfixturevalue(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def examples(clevr_task):
    return clevr_task.load("train", limit=4)


def mixed_items(task, examples) -> list[TrainItem]:
    first, second, third, fourth = examples
    return [
        TrainItem("qa", first.id, task.qa_prompt(first), task.answer_line(first.answer, first)),
        TrainItem("cot", second.id, task.cot_prompt(second), task.teacher_rationale(second)),
        TrainItem("refine", third.id, refine_prompt(task, third, "There are 2 objects.\nAnswer: 2"),
                  task.teacher_rationale(third)),
        TrainItem("select", fourth.id, select_prompt(task, fourth, ["Answer: 1", "Answer: 3", "Answer: 0"]),
                  str(fourth.answer)),
    ]


@pytest.mark.parametrize("name", MODELS)
def test_labels_cover_exactly_the_target_and_the_end_of_turn(name, loaded, clevr_task, examples):
    lm = loaded(name)
    tokenizer = lm.processor.tokenizer
    example = examples[1]
    prompt, target = clevr_task.cot_prompt(example), clevr_task.teacher_rationale(example)
    images = example.load_images()
    features, status = encode_item(lm.processor, prompt, target, images, end_of_turn(lm.processor), 2048)
    assert status == "ok"

    labelled = features["labels"] != -100
    assert tokenizer.decode(features["input_ids"][labelled]) == target + "<|im_end|>"
    assert torch.equal(features["labels"][labelled], features["input_ids"][labelled])
    # The labelled span is one block at the end; everything before it is the generation prompt,
    # token for token what the HF backend feeds the model at inference.
    n_prompt = int((~labelled).sum())
    assert labelled[n_prompt:].all()
    backend_text = lm.processor.apply_chat_template(
        Request.user(prompt, images).messages, add_generation_prompt=True, tokenize=False
    )
    assert torch.equal(features["input_ids"][:n_prompt], encode(lm.processor, backend_text, images)["input_ids"])


def test_end_of_turn_is_read_from_the_chat_template(loaded):
    processor = loaded("tiny_qwen").processor
    assert end_of_turn(processor) == "<|im_end|>"

    other = copy.deepcopy(processor)
    other.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}"
        "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert end_of_turn(other) == "<|endoftext|>"

    # A template that closes turns with plain text: the tokenizer's EOS ends the target.
    other.chat_template = other.chat_template.replace("<|endoftext|>", "")
    other.tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn(other) == "<|endoftext|>"


@pytest.mark.parametrize("name", MODELS)
def test_a_collated_batch_carries_every_model_input_and_matches_single_items(name, loaded, clevr_task, examples):
    lm = loaded(name)
    items = mixed_items(clevr_task, examples)
    items[3].images = []  # one text-only item in the batch: it adds no pixel rows
    dataset = ItemDataset(lm.processor, items, {ex.id: ex for ex in examples}, max_length=2048)
    features = [dataset[i] for i in range(len(dataset))]
    batch = CompletionCollator(lm.processor.tokenizer.pad_token_id)(features)

    lengths = [f["input_ids"].shape[0] for f in features]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["objective"].tolist() == [OBJECTIVES.index(item.objective) for item in items]
    for row, length in enumerate(lengths):  # right padding: pads masked, unlabelled
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert (batch["labels"][row, length:] == -100).all()
        assert (batch["input_ids"][row, length:] == lm.processor.tokenizer.pad_token_id).all()
    if name == "tiny_qwen":
        assert {"mm_token_type_ids", "pixel_values", "image_grid_thw"} <= batch.keys()
        image_token = lm.model.config.image_token_id
        assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_token)
        assert batch["image_grid_thw"].shape == (3, 3)
        patches = int(batch["image_grid_thw"].prod(dim=1).sum())
        assert batch["pixel_values"].shape[0] == patches
    else:
        assert batch["pixel_values"].shape == (3, 3, 56, 56)

    # The batch runs through the model, and each row's logits equal those of the item alone:
    # padding, pixel order and the multimodal token types are all where the model expects them.
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "objective", PADDING_KEY)}
    with torch.no_grad():
        logits = lm.model(**inputs).logits
        for row, feature in enumerate(features):
            single = {k: (v[None] if k in inputs and v.dim() == 1 else v) for k, v in feature.items()
                      if k not in ("labels", "objective")}
            alone = lm.model(**single).logits[0]
            assert torch.allclose(logits[row, : lengths[row]], alone, atol=1e-4)


def test_a_text_only_prompt_opening_a_batch_keeps_the_other_prompts_images():
    """Keys come from every feature: a batch sorted by length often opens with its text-only prompt,
    which has no vision tensors and no token types; the image prompts' tensors must stay."""
    text_only = {"input_ids": torch.tensor([5, 6]), "attention_mask": torch.ones(2, dtype=torch.long)}
    with_image = {"input_ids": torch.tensor([7, 8, 9]), "attention_mask": torch.ones(3, dtype=torch.long),
                  "mm_token_type_ids": torch.tensor([0, 1, 0]), "pixel_values": torch.ones(4, 6)}
    batch = collate([text_only, with_image], pad_token_id=0, padding_side="left")
    assert torch.equal(batch["pixel_values"], with_image["pixel_values"])
    assert batch["mm_token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 0]]  # text, and left padding, are 0
    assert batch["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]


def test_vision_rows_of_different_shapes_are_zero_padded_to_the_largest():
    """LLaVA-OneVision gives each image its own number of crops; the model reads only its own."""
    five, three = torch.ones(1, 5, 3, 2, 2), torch.full((1, 3, 3, 2, 2), 2.0)
    rows = concat_rows([five, three])
    assert rows.shape == (2, 5, 3, 2, 2)
    assert torch.equal(rows[0], five[0]) and torch.equal(rows[1, :3], three[0]) and not rows[1, 3:].any()
    with pytest.raises(ValueError, match="cannot batch vision tensors"):
        concat_rows([torch.ones(2, 3), torch.ones(2, 3, 4)])


def test_over_long_items_lose_target_tokens_never_image_tokens(loaded, clevr_task, examples, caplog):
    lm = loaded("tiny_qwen")
    example = examples[0]
    prompt, target = clevr_task.cot_prompt(example), clevr_task.teacher_rationale(example)
    images = example.load_images()
    end = end_of_turn(lm.processor)
    full, _ = encode_item(lm.processor, prompt, target, images, end, 2048)
    n_prompt = int((full["labels"] == -100).sum())

    cut, status = encode_item(lm.processor, prompt, target, images, end, n_prompt + 3)
    assert status == "truncated" and cut["input_ids"].shape[0] == n_prompt + 3
    assert torch.equal(cut["input_ids"], full["input_ids"][: n_prompt + 3])
    assert int((cut["labels"] != -100).sum()) == 3
    image_token = lm.model.config.image_token_id
    assert int((cut["input_ids"] == image_token).sum()) == int((full["input_ids"] == image_token).sum()) == 16

    assert encode_item(lm.processor, prompt, target, images, end, n_prompt) == (None, "skipped")

    items = [TrainItem("cot", example.id, prompt, target), TrainItem("qa", example.id, "x " * 400, "1")]
    with caplog.at_level(logging.WARNING, logger="r3v.train.data"):
        dataset = ItemDataset(lm.processor, items, {example.id: example}, max_length=n_prompt + 3)
    assert len(dataset) == 1 and len(dataset.truncated) == 1 and len(dataset.skipped) == 1
    assert "item 1 (qa, example train-0)" in dataset.skipped[0]
    assert dataset.over_length == {"skipped": {"qa": 1}, "truncated": {"cot": 1}}
    assert "skipped 1 item" in caplog.text and "cut the target of 1 item" in caplog.text
    assert "(qa 1)" in caplog.text and "(cot 1)" in caplog.text
    assert torch.equal(dataset[0]["input_ids"], cut["input_ids"])


def test_bad_items_raise_data_errors_that_name_the_item(loaded, clevr_task, examples):
    processor = loaded("tiny_qwen").processor
    by_id = {ex.id: ex for ex in examples}
    ex = examples[0]
    cases = [
        (TrainItem("essay", ex.id, "q", "a"), "unknown item kind 'essay'"),
        (TrainItem("qa", "train-999", "q", "a"), "example 'train-999' is not among the 4 examples"),
        (TrainItem("qa", ex.id, "q", "  "), "empty target"),
        (TrainItem("qa", "warmup-1", "q", "a", images=["/nonexistent/r3v/cat.png"]), "image file not found"),
    ]
    for item, message in cases:
        with pytest.raises(DataError, match=message) as error:
            ItemDataset(processor, [TrainItem("qa", ex.id, "fine", "1"), item], by_id, max_length=512)
        assert "item 1" in str(error.value)


def test_items_beyond_the_cache_budget_are_encoded_again_identically(loaded, clevr_task, examples):
    processor = loaded("tiny_qwen").processor
    items = mixed_items(clevr_task, examples)
    by_id = {ex.id: ex for ex in examples}
    cached = ItemDataset(processor, items, by_id, max_length=2048)
    lazy = ItemDataset(processor, items, by_id, max_length=2048, cache_bytes=0)
    assert cached.lengths == lazy.lengths and cached.items_per_objective() == {"sft": 2, "refine": 1, "select": 1}
    for i in range(4):
        a, b = cached[i], lazy[i]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert len(cached._cache) == 4 and not lazy._cache


@pytest.mark.parametrize("name", MODELS)
def test_lengths_are_measured_exactly_without_processing_any_image(name, loaded, clevr_task, tmp_path, monkeypatch):
    """The length of every item, from its text and its images' sizes, equals its real encoding,
    and building the dataset runs the image processor once per distinct size, not per item."""
    from PIL import Image

    lm = loaded(name)
    examples = clevr_task.load("train", limit=6)
    items = mixed_items(clevr_task, examples[:4])
    # images on disk, of several sizes, one item showing two images
    paths = []
    for i, (width, height) in enumerate([(112, 112), (300, 180), (57, 400), (112, 112)]):
        path = tmp_path / f"img{i}.png"
        examples[i].load_images()[0].resize((width, height)).save(path)
        paths.append(str(path))
    items += [TrainItem("qa", "file-0", "How many?", "3", images=[paths[1]]),
              TrainItem("cot", "file-1", "Count both.", "There are 2.\nAnswer: 2", images=[paths[2], paths[3]]),
              TrainItem("distill", "text-only", "What is 7 - 3?", "7 - 3 = 4.", images=[])]
    calls = []
    image_processor = lm.processor.image_processor
    original = type(image_processor).__call__
    monkeypatch.setattr(type(image_processor), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    dataset = ItemDataset(lm.processor, items, {ex.id: ex for ex in examples}, max_length=2048)
    distinct_sizes = {(112, 112), (300, 180), (57, 400)}
    assert len(calls) <= len(distinct_sizes) + 1  # one probe per size (the first may be a cached one)
    for i, item in enumerate(items):
        encoded, _ = encode_item(lm.processor, item.prompt, item.target,
                                 [Image.open(p).convert("RGB") for p in item.images] if item.images is not None
                                 else examples[[ex.id for ex in examples].index(item.example_id)].load_images(),
                                 dataset.end_token, 2048)
        assert dataset.lengths[i] == encoded["input_ids"].shape[0], item
        assert torch.equal(dataset[i]["input_ids"], encoded["input_ids"])


def test_step_sampler_lays_out_the_same_steps_for_any_number_of_processes():
    """The order depends on the step size only: whatever micro-batch a process count implies, the
    items of each optimizer step are the same, and the last step is padded with label-free copies."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(103)]
    sampler = StepSampler(lengths, step_items=16, seed=7, block_steps=3)
    order = list(sampler)
    assert sorted(order) == list(range(103)) and len(sampler) == 103  # 6 steps of 16, then 7 items
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert list(StepSampler(lengths, 16, seed=8, block_steps=3)) != order
    # padded for 4 processes x 2 items: the short last step of 7 gets one label-free copy
    padded = list(StepSampler(lengths, 16, seed=7, block_steps=3, pad_multiple=8))
    assert len(padded) == 104 and padded[:103] == order and padded[103] - 103 in order[96:]

    def steps_seen(processes: int, per_device: int) -> list[set[int]]:
        """What accelerate hands each process, regrouped into optimizer steps as the Trainer runs
        them (the last one with the micro-batches that are left)."""
        accumulation = 16 // (processes * per_device)
        sampler = StepSampler(lengths, 16, seed=7, block_steps=3, pad_multiple=processes * per_device)
        batches = BatchSampler(sampler, per_device, drop_last=False)
        per_process = [list(BatchSamplerShard(batches, processes, rank, split_batches=False)) for rank in range(processes)]
        assert len({len(p) for p in per_process}) == 1  # every process runs the same number of micro-batches
        assert all(len(b) == per_device for p in per_process for b in p)  # and every one is full
        return [{i for p in per_process for b in p[s:s + accumulation] for i in b if i < 103}
                for s in range(0, len(per_process[0]), accumulation)]

    one = steps_seen(1, 16)
    assert one == [set(order[s * 16:(s + 1) * 16]) for s in range(7)]
    for processes, per_device in ((1, 4), (2, 8), (2, 2), (4, 4), (8, 1), (1, 1)):
        assert steps_seen(processes, per_device) == one

    def padded_tokens(order: list[int], batch: int = 16) -> int:
        real = [i for i in order if i < 103]
        batches = [real[i : i + batch] for i in range(0, len(real), batch)]
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = StepSampler(lengths, 16, seed=7, group_by_length=False)
    assert padded_tokens(order) < 0.8 * padded_tokens(list(plain))
    assert max(lengths) == lengths[order[0]]  # the longest item runs first, in the first step


def test_padding_copies_carry_no_labels(loaded, clevr_task, examples):
    processor = loaded("tiny_qwen").processor
    dataset = ItemDataset(processor, mixed_items(clevr_task, examples), {ex.id: ex for ex in examples}, max_length=2048)
    real, copy_ = dataset[1], dataset[len(dataset) + 1]
    assert torch.equal(real["input_ids"], copy_["input_ids"]) and copy_[PADDING_KEY] is True
    assert (copy_["labels"] == -100).all() and (real["labels"] != -100).any()
    batch = CompletionCollator(processor.tokenizer.pad_token_id)([real, copy_])
    assert batch[PADDING_KEY].tolist() == [False, True]


def test_items_with_the_same_image_share_its_tensors(loaded, clevr_task, examples):
    processor = loaded("tiny_qwen").processor
    first, second = examples[0], examples[1]
    items = [
        TrainItem("qa", first.id, clevr_task.qa_prompt(first), "1"),
        TrainItem("cot", first.id, clevr_task.cot_prompt(first), clevr_task.teacher_rationale(first)),
        TrainItem("refine", first.id, refine_prompt(clevr_task, first, "wrong"), clevr_task.teacher_rationale(first)),
        TrainItem("qa", second.id, clevr_task.qa_prompt(second), "2"),
    ]
    by_id = {first.id: first, second.id: second}
    dataset = ItemDataset(processor, items, by_id, max_length=2048)
    rows = [dataset[i] for i in range(4)]
    assert rows[0]["pixel_values"] is rows[1]["pixel_values"] is rows[2]["pixel_values"]
    assert rows[3]["pixel_values"] is not rows[0]["pixel_values"]
    # Sharing changes no value: every item equals its fresh encoding.
    lazy = ItemDataset(processor, items, by_id, max_length=2048, cache_bytes=0)
    for i, row in enumerate(rows):
        fresh = lazy[i]
        assert row.keys() == fresh.keys()
        assert all(torch.equal(row[k], fresh[k]) if isinstance(row[k], torch.Tensor) else row[k] == fresh[k] for k in row)
    # The cache budget counts a shared image once: one image plus the three items' text fits.
    def nbytes(features, keys):
        return sum(features[k].numel() * features[k].element_size() for k in keys)

    text_keys = [k for k in rows[0] if k in SEQUENCE_KEYS]
    image_keys = [k for k in rows[0] if k not in SEQUENCE_KEYS and k not in ("objective", IMAGE_SET_KEY)]
    budget = nbytes(rows[0], image_keys) + sum(nbytes(rows[i], text_keys) for i in range(3))
    assert budget < 2 * nbytes(rows[0], image_keys)  # without sharing, only one of them would fit
    tight = ItemDataset(processor, items[:3], by_id, max_length=2048, cache_bytes=budget)
    for i in range(3):
        tight[i]
    assert sorted(tight._cache) == [0, 1, 2]
    # past the budget, the least recently used encoding goes first
    smaller = nbytes(rows[0], image_keys) + nbytes(rows[0], text_keys) + max(nbytes(rows[i], text_keys) for i in (1, 2))
    lru = ItemDataset(processor, items[:3], by_id, max_length=2048, cache_bytes=smaller)
    for i in (0, 1, 0, 2):
        lru[i]
    assert sorted(lru._cache) == [0, 2]


def _previous_sampler_order(lengths: list[int], batch_size: int, seed: int, epoch: int, block_batches: int = 50) -> list[int]:
    """r3v's earlier LengthGroupedSampler, kept here as the reference for single-process runs."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    block = batch_size * block_batches
    full, partial = [], []
    for start in range(0, len(order), block):
        chunk = sorted(order[start : start + block], key=lambda i: (-lengths[i], i))
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            (full if len(batch) == batch_size else partial).append(batch)
    batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return [i for batch in batches + partial for i in batch]


def test_one_process_keeps_the_previous_data_order():
    """With one process and the step equal to the micro-batch (the built-in demo's setting), the
    step layout is the order r3v trained in before steps existed: runs stay comparable."""
    rng = random.Random(1)
    lengths = [rng.randint(10, 400) for _ in range(1234)]
    for epoch in (0, 3):
        sampler = StepSampler(lengths, step_items=16, seed=5)
        sampler.set_epoch(epoch)
        assert list(sampler) == _previous_sampler_order(lengths, 16, seed=5, epoch=epoch)
