"""One vision-encoder pass per distinct image set: same loss and gradients as the plain forward."""

from __future__ import annotations

import pytest
import torch

from r3v.models import shared_images
from r3v.models.loading import load_model
from r3v.prompts import select_prompt
from r3v.records import TrainItem
from r3v.train.data import CompletionCollator, ItemDataset
from r3v.train.trainer import VISION_TOWER_PATTERN


@pytest.fixture(scope="module")
def examples(clevr_task):
    return clevr_task.load("train", limit=2)


def repeated_image_items(task, examples) -> list[TrainItem]:
    """Sets A, B, A, none, {B, A}, A, {B, A} (tests/test_families.py checks every family on it)."""
    first, second = examples
    pair = [second.images[0], first.images[0]]
    return [
        TrainItem("qa", first.id, task.qa_prompt(first), task.answer_line(first.answer, first)),
        TrainItem("cot", second.id, task.cot_prompt(second), task.teacher_rationale(second)),
        TrainItem("cot", first.id, task.cot_prompt(first), task.teacher_rationale(first)),
        TrainItem("qa", first.id, "How many objects are there?", "Answer: 1", images=[]),
        TrainItem("qa", second.id, "Same count in both?", "Answer: no", images=pair),
        TrainItem("select", first.id, select_prompt(task, first, ["Answer: 1", "Answer: 3"]), str(first.answer)),
        TrainItem("qa", second.id, "Count in the second image?", "Answer: 2", images=pair),
    ]


def test_distinct_image_sets_keeps_first_occurrences_and_indexes_every_image():
    def feature(set_id, count):
        return {"pixel_values": torch.full((count, 2), float(set_id)), shared_images.IMAGE_SET_KEY: (set_id, count)}

    features = [feature(0, 1), {"input_ids": torch.ones(3)}, feature(1, 2), feature(0, 1), feature(1, 2)]
    kept, index, sets = shared_images.distinct_image_sets(features)
    assert kept == [features[0], features[2]]
    assert index.tolist() == [0, 1, 2, 0, 1, 2]
    assert sets.tolist() == [[0, 1], [1, 2]]

    odd = {**feature(0, 1), "pixel_values_videos": torch.zeros(1, 2)}  # a vision input this module does not know
    kept, index, sets = shared_images.distinct_image_sets([feature(0, 1), odd])
    assert index is None and sets is None and len(kept) == 2


@pytest.mark.parametrize("name", ["tiny_qwen", "tiny_llava"])
def test_shared_forward_gives_the_plain_loss_and_gradients_with_a_trainable_encoder(name, request, clevr_task, examples):
    lm = load_model(request.getfixturevalue(name))
    model = lm.model.train(False)  # no dropout: the two forwards must see the same function
    assert shared_images.supports_shared_images(model)
    items = repeated_image_items(clevr_task, examples)
    dataset = ItemDataset(lm.processor, items, {ex.id: ex for ex in examples}, max_length=2048)
    features = [dataset[i] for i in range(len(dataset))]
    pad = lm.processor.tokenizer.pad_token_id

    plain = CompletionCollator(pad)(features)
    shared = CompletionCollator(pad, share_images=True)(features)
    # Images per item: 1, 1, 1, 0, 2, 1, 2 over three distinct sets ({A}, {B}, {B, A}).
    assert shared[shared_images.IMAGE_INDEX_KEY].tolist() == [0, 1, 0, 2, 3, 0, 2, 3]
    assert shared["pixel_values"].shape[0] * 2 == plain["pixel_values"].shape[0]
    assert torch.equal(shared["input_ids"], plain["input_ids"])

    def loss_and_grads(batch):
        batch = dict(batch)
        batch.pop("objective")
        model.zero_grad(set_to_none=True)
        loss = shared_images.forward(model, batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads(plain)
    shared_loss, shared_grads = loss_and_grads(shared)
    assert torch.allclose(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == shared_grads.keys()
    vision = [n for n in plain_grads if VISION_TOWER_PATTERN.search(n)]
    assert vision, "the vision encoder must receive gradients in this check"
    for key, grad in plain_grads.items():
        assert torch.allclose(shared_grads[key], grad, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("name", ["tiny_qwen", "tiny_llava"])
def test_a_frozen_encoder_is_run_once_per_image_set_across_steps(name, request, clevr_task, examples):
    from r3v.train import TrainConfig, prepare_model

    lm = load_model(request.getfixturevalue(name))
    assert not shared_images.encoder_is_frozen(lm.model)  # full fine-tuning: the encoder trains
    model = prepare_model(lm.model, TrainConfig(lora=True)).train(False)  # LoRA on the language model
    assert shared_images.encoder_is_frozen(model)
    items = repeated_image_items(clevr_task, examples)
    dataset = ItemDataset(lm.processor, items, {ex.id: ex for ex in examples}, max_length=2048)
    pad = lm.processor.tokenizer.pad_token_id
    plain = CompletionCollator(pad)([dataset[i] for i in range(len(dataset))])
    shared = CompletionCollator(pad, share_images=True)

    def loss_and_grads(batch, cache=None):
        batch = {k: v for k, v in batch.items() if k != "objective"}
        model.zero_grad(set_to_none=True)
        loss = shared_images.forward(model, batch, cache=cache).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected_grads = loss_and_grads(plain)
    cache = shared_images.EncoderCache(budget_bytes=1 << 30)
    # Step 1 sees items 0-3 (sets A and B), step 2 all items: only the set {B, A} is new there.
    loss_and_grads(shared([dataset[i] for i in range(4)]), cache)
    assert (cache.misses, cache.hits) == (2, 0)
    loss, grads = loss_and_grads(shared([dataset[i] for i in range(len(dataset))]), cache)
    assert (cache.misses, cache.hits) == (3, 2)
    assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for key, grad in expected_grads.items():
        assert torch.allclose(grads[key], grad, rtol=1e-4, atol=1e-6), key

    full = shared_images.EncoderCache(budget_bytes=0)  # no room: every step encodes again, same result
    loss_and_grads(shared([dataset[i] for i in range(len(dataset))]), full)
    loss, _ = loss_and_grads(shared([dataset[i] for i in range(len(dataset))]), full)
    assert full.features == {} and full.misses == 6 and torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
