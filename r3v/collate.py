"""Training inputs: one chat prompt plus its target per item, loss on the target tokens only.

An item becomes ``prompt ids + target ids + end-of-turn id``. The prompt is rendered with the
processor's own chat template (images first, then the text, then the generation prompt), exactly
as ``HFBackend`` renders it at inference, and encoded with ``r3v.models.batching.encode`` so the
image placeholders expand to the model's image tokens. The target is tokenized on its own and
appended: that is the token sequence the model produces when it generates after that prompt.
Labels are -100 on every prompt and padding position.

Over-long items are cut from the target end (image tokens live in the prompt and are never cut);
an item whose prompt alone fills ``max_length`` is skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from r3v.backends.base import Request
from r3v.errors import DataError
from r3v.models.batching import SEQUENCE_KEYS, collate
from r3v.models.batching import encode as encode_prompt
from r3v.models.shared_images import IMAGE_INDEX_KEY, IMAGE_SET_KEY, IMAGE_SETS_KEY, distinct_image_sets
from r3v.records import OBJECTIVE_OF_KIND, Example, TrainItem, load_image

log = logging.getLogger(__name__)

#: The three R3V objectives, in the order their losses are indexed in a batch's ``objective`` tensor.
OBJECTIVES = ("sft", "refine", "select")

_SENTINEL = "R3V-TARGET-SENTINEL"


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def end_of_turn(processor: Any) -> str:
    """The token that closes an assistant turn in the processor's chat template.

    Rendered from the template itself (an assistant message with a sentinel text; the first
    special token after it), so ChatML gives ``<|im_end|>`` and other templates give their own
    marker. Falls back to the tokenizer's EOS token when the template shows none.
    """
    tokenizer = tokenizer_of(processor)
    messages = Request.user("x").messages + [
        {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}
    ]
    try:
        rendered = processor.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template that cannot render an assistant turn: use EOS below
        log.debug("chat template cannot render an assistant turn (%s); using the EOS token", exc)
        rendered = ""
    if _SENTINEL in rendered:
        special = set(tokenizer.all_special_ids)
        special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
        for token_id in tokenizer(rendered.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]:
            if not tokenizer.decode([token_id]).strip():
                continue  # whitespace between the text and the end marker
            if token_id in special:
                return tokenizer.convert_ids_to_tokens(token_id)
            break
    if tokenizer.eos_token is None:
        raise ValueError("cannot tell how an assistant turn ends: the chat template shows no end token and there is no EOS")
    return tokenizer.eos_token


def prompt_text(processor: Any, prompt: str, num_images: int) -> str:
    """The chat-template prompt, as the HF backend builds it for generation."""
    messages = Request.user(prompt, [None] * num_images).messages
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_item(
    processor: Any, prompt: str, target: str, images: Sequence[Any], end_token: str, max_length: int
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Encode one item. Returns (features, status): status is "ok", "truncated" or "skipped".

    Sequence features cover prompt + target; ``labels`` is -100 on the prompt. Every other
    processor output (pixel_values, image_grid_thw, ...) is passed through unchanged.
    """
    features = encode_prompt(processor, prompt_text(processor, prompt, len(images)), images)
    tokenizer = tokenizer_of(processor)
    target_ids = tokenizer(target + end_token, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    prompt_length = features["input_ids"].shape[0]
    room = max_length - prompt_length
    if room < 1:
        return None, "skipped"
    status = "ok"
    if target_ids.shape[0] > room:
        target_ids, status = target_ids[:room], "truncated"
    n = target_ids.shape[0]
    out = {}
    for key, value in features.items():
        if key not in SEQUENCE_KEYS:
            out[key] = value
        elif key == "input_ids":
            out[key] = torch.cat([value, target_ids.to(value.dtype)])
        else:
            # attention is 1 on the target; mm_token_type_ids / token_type_ids mark text there (0)
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, torch.full((n,), fill, dtype=value.dtype)])
    out["labels"] = torch.cat([torch.full((prompt_length,), -100, dtype=torch.long), target_ids.long()])
    return out, status


@dataclass
class CompletionCollator:
    """Right-pads sequence features (labels with -100) and concatenates vision features.

    Rows without images simply contribute no pixel rows, so text-only and image items can share
    a batch. ``objective`` becomes a (batch,) tensor of indices into ``OBJECTIVES``.
    """

    pad_token_id: int
    share_images: bool = False
    """Keep each distinct image set's vision tensors once (see ``r3v.models.shared_images``)."""

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequence_keys = [k for k in SEQUENCE_KEYS if any(k in f for f in features)]
        rows = []
        for feature in features:
            length = feature["input_ids"].shape[0]
            row = {}
            for key in sequence_keys:
                row[key] = feature[key] if key in feature else torch.zeros(length, dtype=torch.long)
            rows.append(row)
        batch = collate(rows, self.pad_token_id, padding_side="right")
        vision_rows = features
        if self.share_images:
            vision_rows, image_index, image_sets = distinct_image_sets(features)
            if image_index is not None:
                batch[IMAGE_INDEX_KEY], batch[IMAGE_SETS_KEY] = image_index, image_sets
        not_vision = {*SEQUENCE_KEYS, "objective", IMAGE_SET_KEY}
        other_keys = [k for f in features for k in f if k not in not_vision]
        for key in dict.fromkeys(other_keys):
            batch[key] = torch.cat([f[key] for f in vision_rows if key in f], dim=0)
        batch["objective"] = torch.tensor([int(f["objective"]) for f in features], dtype=torch.long)
        return batch


class ItemDataset(Dataset):
    """TrainItems encoded for training, with their lengths (for length grouping) and objectives.

    Every item is encoded once up front, to measure it and to drop the ones that do not fit.
    Encodings are kept in memory up to ``cache_bytes``; items past that budget are encoded again
    when the loader asks for them (encoding is deterministic), so large image sets do not have to
    fit in RAM. Items with the same images (an R3V mixture has QA, CoT, refine and select items
    per image) share one copy of the image tensors, which are most of an encoding's size.
    """

    def __init__(
        self,
        processor: Any,
        items: Sequence[TrainItem],
        examples: dict[str, Example],
        max_length: int,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.processor = processor
        self.end_token = end_of_turn(processor)
        self.max_length = max_length
        self.entries: list[tuple[TrainItem, list[Any]]] = []  # (item, image paths or PIL images)
        self.lengths: list[int] = []
        self.objectives: list[int] = []
        self.target_tokens = 0
        self.truncated: list[str] = []
        self.skipped: list[str] = []
        self._cache: list[dict[str, torch.Tensor] | None] = []
        self.image_sets: list[tuple[int, int] | None] = []  # (image set id, number of images) per item
        set_ids: dict[tuple, int] = {}
        shared: dict[tuple, dict[str, torch.Tensor]] = {}  # image tensors of cached items, by image source
        used = 0
        for position, item in enumerate(items):
            record = f"item {position} ({item.kind}, example {item.example_id})"
            objective = _objective_index(item, record)
            images = _item_images(item, examples, record)
            features, status = encode_item(processor, item.prompt, item.target, images, self.end_token, max_length)
            if features is None:
                self.skipped.append(record)
                continue
            if status == "truncated":
                self.truncated.append(record)
            sources = _image_sources(item, examples)
            # A path names its file; an in-memory image is the same object while ``entries`` holds it.
            key = tuple(src if isinstance(src, str) else id(src) for src in sources)
            reused = shared.get(key, {}) if sources else {}
            features.update(reused)
            size = sum(t.numel() * t.element_size() for k, t in features.items() if k not in reused)
            keep = used + size <= cache_bytes
            used += size if keep else 0
            if keep and sources and not reused:
                shared[key] = {k: v for k, v in features.items() if k not in SEQUENCE_KEYS}
            self.entries.append((item, sources))
            self.image_sets.append((set_ids.setdefault(key, len(set_ids)), len(sources)) if sources else None)
            self._cache.append(features if keep else None)
            self.lengths.append(int(features["input_ids"].shape[0]))
            self.objectives.append(objective)
            self.target_tokens += int((features["labels"] != -100).sum())
        if self.skipped:
            log.warning(
                "skipped %d item(s) whose prompt alone is longer than max_length=%d, e.g. %s",
                len(self.skipped), max_length, self.skipped[0],
            )
        if self.truncated:
            log.warning(
                "cut the target of %d item(s) to fit max_length=%d, e.g. %s",
                len(self.truncated), max_length, self.truncated[0],
            )

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = self._cache[index]
        if features is None:
            item, sources = self.entries[index]
            images = [load_image(src, record=item.example_id) for src in sources]
            features, _ = encode_item(self.processor, item.prompt, item.target, images, self.end_token, self.max_length)
        extra = {IMAGE_SET_KEY: self.image_sets[index]} if self.image_sets[index] else {}
        return {**features, "objective": self.objectives[index], **extra}

    def items_per_objective(self) -> dict[str, int]:
        return {name: self.objectives.count(i) for i, name in enumerate(OBJECTIVES)}


class LengthGroupedSampler(Sampler[int]):
    """A seeded shuffle per epoch that, optionally, puts items of similar length in the same batch.

    The shuffled order is cut into blocks of ``batch_size * block_batches`` items; each block is
    sorted by length and split into batches, and the batches are shuffled again. The batch holding
    the longest item comes first, so an out-of-memory shows up on the first step, not hours in.
    The order depends only on (seed, epoch), which makes a resumed run see the same batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True, block_batches: int = 50
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.block_batches = block_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return iter(order)
        block = self.batch_size * self.block_batches
        full: list[list[int]] = []
        partial: list[list[int]] = []
        for start in range(0, len(order), block):
            chunk = sorted(order[start : start + block], key=lambda i: (-self.lengths[i], i))
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else partial).append(batch)
        # Only a batch that stays whole through batching may move: partial ones keep the end.
        batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return iter([i for batch in batches + partial for i in batch])


def _objective_index(item: TrainItem, record: str) -> int:
    if item.kind not in OBJECTIVE_OF_KIND:
        raise DataError(f"unknown item kind {item.kind!r}; known: {', '.join(OBJECTIVE_OF_KIND)}", record=record)
    if not item.target or not item.target.strip():
        raise DataError("empty target: nothing to train on", record=record)
    return OBJECTIVES.index(item.objective)


def _image_sources(item: TrainItem, examples: dict[str, Example]) -> list[Any]:
    if item.images is not None:
        return list(item.images)
    return list(examples[item.example_id].images)


def _item_images(item: TrainItem, examples: dict[str, Example], record: str) -> list[Any]:
    if item.images is None and item.example_id not in examples:
        raise DataError(f"example {item.example_id!r} is not among the {len(examples)} examples given", record=record)
    return [load_image(src, record=record) for src in _image_sources(item, examples)]
