"""Training inputs: one chat prompt plus its target per item, loss on the target tokens only.

An item becomes ``prompt ids + target ids + end-of-turn id``. The prompt is rendered with the
processor's own chat template (images first, then the text, then the generation prompt), exactly
as ``HFBackend`` renders it at inference, and encoded with ``r3v.models.batching.encode`` so the
image placeholders expand to the model's image tokens. The target is tokenized on its own and
appended: that is the token sequence the model produces when it generates after that prompt.
Labels are -100 on every prompt and padding position.

Over-long items are cut from the target end (image tokens live in the prompt and are never cut);
an item whose prompt alone fills ``max_length`` is skipped. Both are counted per item kind.

Nothing is encoded up front. ``ItemDataset`` measures every item's length from its text and its
images' sizes (``LengthMeter``: the processor runs once per distinct image size, on a blank
image), so start-up costs a tokenizer pass, not an image-processor pass over the mixture. The
images are processed when the DataLoader asks for an item, in its worker processes.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from r3v.errors import DataError
from r3v.models.batching import SEQUENCE_KEYS, collate, concat_rows
from r3v.models.batching import encode as encode_prompt
from r3v.models.shared_images import (
    IMAGE_INDEX_KEY,
    IMAGE_SET_KEY,
    IMAGE_SETS_KEY,
    distinct_image_sets,
    encoder_units,
)
from r3v.records import (
    MAX_ASPECT_RATIO,
    OBJECTIVE_OF_KIND,
    OBJECTIVES,
    Example,
    Request,
    TrainItem,
    load_image,
)
from r3v.seeds import stride_seed

log = logging.getLogger(__name__)

#: Per-row batch entry: True for the copies that pad an epoch's last optimizer step (no labels).
PADDING_KEY = "padding"

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


class LengthMeter:
    """Token counts of chat prompts from their text and their images' sizes alone.

    A processor turns each image placeholder into a number of tokens that depends only on the
    image's size (Qwen2-VL: one per 28x28 patch after resizing; InternVL: per tile, the tiles
    following the aspect ratio; Idefics3: per crop of the split image; LLaVA-OneVision: per crop
    of its anyres grid; LLaVA, Gemma 3: a constant), so the meter
    runs the processor once per distinct size, on a blank image, and adds that count to the
    tokenizer's count of the text. ``r3v.collate.ItemDataset`` checks each prediction against the
    real encoding when the item is used.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self._per_image: dict[tuple[int, int], int] = {}
        probe = prompt_text(processor, "x", 0)
        # a processor may add special tokens its tokenizer's default call does not: count them once
        self._per_call = encode_prompt(processor, probe, [])["input_ids"].shape[0] - self._count([probe])[0]

    def _count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens one image of ``size`` (width, height) adds to a prompt, beyond its placeholder text."""
        if size not in self._per_image:
            text = prompt_text(self.processor, "x", 1)
            encoded = encode_prompt(self.processor, text, [Image.new("RGB", size)])["input_ids"].shape[0]
            self._per_image[size] = encoded - self._count([text])[0] - self._per_call
        return self._per_image[size]

    def prompt_lengths(self, texts: list[str], image_sizes: list[list[tuple[int, int]]]) -> list[int]:
        """Encoded length of each rendered prompt text with its images (one size per image)."""
        counts = self._count(texts) if texts else []
        return [count + self._per_call + sum(self.image_tokens(size) for size in sizes)
                for count, sizes in zip(counts, image_sizes, strict=True)]


def image_size(source: Any, record: str) -> tuple[int, int]:
    """(width, height) of an image path or PIL image, reading only the file's header."""
    if isinstance(source, Image.Image):
        return source.size
    path = Path(source)
    if not path.exists():
        raise DataError(f"image file not found: {path}", path=path, record=record)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}", path=path, record=record) from exc
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(
            f"image {path} is {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}:1, which VLM processors reject",
            path=path, record=record,
        )
    return width, height


@dataclass
class CompletionCollator:
    """Right-pads sequence features (labels with -100) and concatenates vision features.

    Rows without images simply contribute no pixel rows, so text-only and image items can share
    a batch. ``objective`` becomes a (batch,) tensor of indices into ``OBJECTIVES``, ``padding``
    a (batch,) bool tensor marking the label-free copies that fill an epoch's last step.
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
        not_vision = {*SEQUENCE_KEYS, "objective", IMAGE_SET_KEY, PADDING_KEY}
        other_keys = [k for f in features for k in f if k not in not_vision]
        for key in dict.fromkeys(other_keys):
            batch[key] = concat_rows([f[key] for f in vision_rows if key in f])
        batch["objective"] = torch.tensor([int(f["objective"]) for f in features], dtype=torch.long)
        batch[PADDING_KEY] = torch.tensor([bool(f.get(PADDING_KEY, False)) for f in features], dtype=torch.bool)
        return batch


class ItemDataset(Dataset):
    """TrainItems with their token lengths and objectives; encoded when the loader asks for them.

    Lengths, and so the skip / truncate decisions, come from ``LengthMeter`` at construction, with
    no image processing. ``dataset[i]`` loads item i's images and encodes it (in a DataLoader
    worker when there are workers), keeping encodings in a per-process cache of ``cache_bytes``;
    items that show the same images (an R3V mixture has QA, CoT, refine and select items per image)
    share one copy of the image tensors there, which is most of an encoding's size.

    Index ``len(dataset) + i`` is a label-free copy of item i: ``StepSampler`` pads an epoch's last
    optimizer step with those, so every process runs the same number of micro-batches.
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
        self.cache_bytes = cache_bytes
        self.entries: list[tuple[TrainItem, list[Any]]] = []  # (item, image paths or PIL images)
        self.lengths: list[int] = []
        self.objectives: list[int] = []
        self.target_tokens = 0
        self.truncated: list[str] = []
        self.skipped: list[str] = []
        #: Over-long items per kind: {"skipped": {kind: n}, "truncated": {kind: n}}.
        self.over_length: dict[str, dict[str, int]] = {"skipped": {}, "truncated": {}}
        self.image_sets: list[tuple[int, int] | None] = []  # (image set id, number of images) per item
        self._prompt_lengths: list[int] = []
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        self._shared: dict[int, tuple[dict[str, torch.Tensor], int]] = {}  # set id -> (vision tensors, users)

        records = [f"item {i} ({item.kind}, example {item.example_id})" for i, item in enumerate(items)]
        objectives = [_objective_index(item, record) for item, record in zip(items, records, strict=True)]
        sources = [_image_sources(item, examples, record) for item, record in zip(items, records, strict=True)]
        sizes_by_key: dict[Any, tuple[int, int]] = {}
        sizes = []
        for record, item_sources in zip(records, sources, strict=True):
            keys = [_source_key(src) for src in item_sources]
            for key, src in zip(keys, item_sources, strict=True):
                if key not in sizes_by_key:
                    sizes_by_key[key] = image_size(src, record)
            sizes.append([sizes_by_key[key] for key in keys])
        meter = LengthMeter(processor)
        tokenizer = tokenizer_of(processor)
        prompts = meter.prompt_lengths(
            [prompt_text(processor, item.prompt, len(srcs)) for item, srcs in zip(items, sources, strict=True)], sizes
        )
        targets = [len(ids) for ids in tokenizer([item.target + self.end_token for item in items],
                                                 add_special_tokens=False)["input_ids"]] if items else []
        set_ids: dict[tuple, int] = {}
        for item, record, objective, item_sources, prompt_length, target_length in zip(
            items, records, objectives, sources, prompts, targets, strict=True
        ):
            room = max_length - prompt_length
            if room < 1:
                self.skipped.append(record)
                _bump(self.over_length["skipped"], item.kind)
                continue
            if target_length > room:
                self.truncated.append(record)
                _bump(self.over_length["truncated"], item.kind)
            key = tuple(_source_key(src) for src in item_sources)
            self.entries.append((item, item_sources))
            self.image_sets.append((set_ids.setdefault(key, len(set_ids)), len(item_sources)) if item_sources else None)
            self._prompt_lengths.append(prompt_length)
            self.lengths.append(prompt_length + min(target_length, room))
            self.objectives.append(objective)
            self.target_tokens += min(target_length, room)
        if self.skipped:
            log.warning("skipped %d item(s) whose prompt alone is longer than max_length=%d (%s), e.g. %s",
                        len(self.skipped), max_length, _per_kind(self.over_length["skipped"]), self.skipped[0])
        if self.truncated:
            log.warning("cut the target of %d item(s) to fit max_length=%d (%s), e.g. %s",
                        len(self.truncated), max_length, _per_kind(self.over_length["truncated"]), self.truncated[0])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        padding = index >= len(self.entries)
        index = index - len(self.entries) if padding else index
        features = self._cache.get(index)
        if features is None:
            features = self._encode(index)
        else:
            self._cache.move_to_end(index)
        out = {**features, "objective": self.objectives[index]}
        if self.image_sets[index]:
            # (set id, encoder units): images, or InternVL's tiles / Idefics3's crops, which the
            # encoding alone tells (see r3v.models.shared_images)
            out[IMAGE_SET_KEY] = (self.image_sets[index][0], encoder_units(features))
        if padding:
            out["labels"] = torch.full_like(features["labels"], -100)
            out[PADDING_KEY] = True
        return out

    def _encode(self, index: int) -> dict[str, torch.Tensor]:
        item, sources = self.entries[index]
        record = f"item {index} ({item.kind}, example {item.example_id})"
        images = [load_image(src, record=record) for src in sources]
        features, _ = encode_item(self.processor, item.prompt, item.target, images, self.end_token, self.max_length)
        prompt_length = None if features is None else int((features["labels"] == -100).sum())
        if prompt_length != self._prompt_lengths[index]:
            raise RuntimeError(
                f"{record}: the processor encoded its prompt to {prompt_length} tokens where r3v predicted "
                f"{self._prompt_lengths[index]} from the text and image sizes; this processor's image tokens "
                "do not depend on the image size alone, which r3v's length measurement assumes"
            )
        self._remember(index, features)
        return features

    def _remember(self, index: int, features: dict[str, torch.Tensor]) -> None:
        """Cache an encoding (least recently used out first), sharing image tensors by image set."""
        set_id = self.image_sets[index][0] if self.image_sets[index] else None
        sequence = _nbytes(v for k, v in features.items() if k in SEQUENCE_KEYS)
        vision = {k: v for k, v in features.items() if k not in SEQUENCE_KEYS}

        def needed() -> int:  # an image set already cached costs nothing more
            return sequence + (0 if set_id is not None and set_id in self._shared else _nbytes(vision.values()))

        if needed() > self.cache_bytes:
            return
        while self._cached_bytes + needed() > self.cache_bytes and self._cache:
            self._forget(*self._cache.popitem(last=False))
        self._cached_bytes += needed()
        if set_id is not None:
            tensors, users = self._shared.get(set_id, (vision, 0))
            features.update(tensors)
            self._shared[set_id] = (tensors, users + 1)
        self._cache[index] = features

    def _forget(self, index: int, features: dict[str, torch.Tensor]) -> None:
        self._cached_bytes -= _nbytes(v for k, v in features.items() if k in SEQUENCE_KEYS)
        image_set = self.image_sets[index]
        if not image_set:
            self._cached_bytes -= _nbytes(v for k, v in features.items() if k not in SEQUENCE_KEYS)
            return
        tensors, users = self._shared[image_set[0]]
        if users > 1:
            self._shared[image_set[0]] = (tensors, users - 1)
        else:
            del self._shared[image_set[0]]
            self._cached_bytes -= _nbytes(tensors.values())

    def items_per_objective(self) -> dict[str, int]:
        return {name: self.objectives.count(i) for i, name in enumerate(OBJECTIVES)}

    def items_per_kind(self) -> dict[str, int]:
        return dict(Counter(item.kind for item, _ in self.entries))


class StepSampler(Sampler[int]):
    """Item order laid out in optimizer steps, the same for any number of processes.

    Each epoch is a seeded shuffle, cut into steps of ``step_items`` consecutive indices (the
    global batch). The DataLoader cuts the order into micro-batches and accelerate deals them
    out to the processes in turn, so step s trains on the same items whether one process
    accumulates all its micro-batches or eight processes share them: the order depends only on
    (seed, epoch, step size), never on the per-device batch.

    With ``group_by_length`` the shuffle is cut into blocks of ``block_steps`` steps, each block
    is sorted by length and cut into steps, the steps are shuffled, and the step holding the
    longest item runs first (an out-of-memory error shows at step 1, not hours in). Items inside a
    step run longest first, so micro-batches hold similar lengths.

    An epoch's last step, when short, is padded up to a multiple of ``pad_multiple`` (processes x
    per-device batch, with several processes) with label-free copies of its own items (indices
    ``len(lengths) + i``, see ``ItemDataset``): they add no loss and no gradient, and every process
    runs the same number of full micro-batches in that step. (Unpadded, accelerate would even out a
    short last micro-batch with repeated real items, which would count twice.) The Trainer runs a
    short last accumulation as it is.
    """

    def __init__(self, lengths: Sequence[int], step_items: int, seed: int, group_by_length: bool = True,
                 block_steps: int = 50, pad_multiple: int = 1) -> None:
        if step_items < 1 or pad_multiple < 1 or step_items % pad_multiple:
            raise ValueError(f"step_items ({step_items}) must be a positive multiple of pad_multiple ({pad_multiple})")
        self.lengths = list(lengths)
        self.step_items = step_items
        self.pad_multiple = pad_multiple
        self.seed = seed
        self.group_by_length = group_by_length
        self.block_steps = block_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, short = divmod(len(self.lengths), self.step_items)
        return full * self.step_items + -(-short // self.pad_multiple) * self.pad_multiple

    def steps(self) -> list[list[int]]:
        """This epoch's steps, each a list of item indices (the last one possibly short)."""
        generator = torch.Generator().manual_seed(stride_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.step_items
        if not self.group_by_length:
            return [order[i : i + size] for i in range(0, len(order), size)]
        block = size * self.block_steps
        full: list[list[int]] = []
        partial: list[list[int]] = []
        for start in range(0, len(order), block):
            chunk = sorted(order[start : start + block], key=lambda i: (-self.lengths[i], i))
            for s in range(0, len(chunk), size):
                step = chunk[s : s + size]
                (full if len(step) == size else partial).append(step)
        steps = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if steps:
            longest = max(range(len(steps)), key=lambda s: max(self.lengths[i] for i in steps[s]))
            steps.insert(0, steps.pop(longest))
        return steps + partial

    def __iter__(self):
        order: list[int] = []
        for step in self.steps():
            step = sorted(step, key=lambda i: (-self.lengths[i], i))
            missing = -len(step) % self.pad_multiple
            pads = [len(self.lengths) + step[j % len(step)] for j in range(missing)]
            order += step + pads
        return iter(order)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bump(counts: dict[str, int], kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


def _per_kind(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def _objective_index(item: TrainItem, record: str) -> int:
    if item.kind not in OBJECTIVE_OF_KIND:
        raise DataError(f"unknown item kind {item.kind!r}; known: {', '.join(OBJECTIVE_OF_KIND)}", record=record)
    if not item.target or not item.target.strip():
        raise DataError("empty target: nothing to train on", record=record)
    return OBJECTIVES.index(item.objective)


def _source_key(source: Any) -> Any:
    # A path names its file; an in-memory image is the same object while the dataset holds it.
    return source if isinstance(source, str) else id(source)


def _image_sources(item: TrainItem, examples: dict[str, Example], record: str) -> list[Any]:
    if item.images is not None:
        return list(item.images)
    if item.example_id not in examples:
        raise DataError(f"example {item.example_id!r} is not among the {len(examples)} examples given", record=record)
    return list(examples[item.example_id].images)
