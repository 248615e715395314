"""Encode each image once: per batch always, and once per run while the encoder is frozen.

An R3V mixture holds several items per question (direct answer, CoT, self-refine, self-select),
all showing the same image, so a batch often carries one image several times. The collator
keeps the vision tensors of each distinct image set once, with the ids of those sets and an
index that lists, image by image in item order, which distinct image each item shows.
``forward`` encodes the distinct images with the model's own ``get_image_features`` and passes
the outputs, repeated in item order, through transformers' ``mm_encoder_outputs`` argument.
Autograd sums the repeated outputs' gradients back into the one encoder pass, so loss and
gradients are those of the plain forward, also when the encoder trains.

When nothing in the encoder trains (LoRA on the language model, R3V's setting) and it has no
dropout, an image's features are the same at every step, so an ``EncoderCache`` keeps them
across steps and epochs, up to a memory budget. tests/test_shared_images.py checks both paths
against the plain forward.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from r3v.models.batching import SEQUENCE_KEYS

#: Per-item feature set by ``ItemDataset``: (id of the item's image set, number of images in it).
IMAGE_SET_KEY = "image_set"
#: Batch entry: for each image of each item, in order, its row among the distinct images.
IMAGE_INDEX_KEY = "image_index"
#: Batch entry: (set id, number of images) of each distinct image set, in the order kept.
IMAGE_SETS_KEY = "image_sets"
#: Vision tensors with one entry (or a block of rows, ``pixel_values``) per image.
PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes")
VISION_KEYS = ("pixel_values", *PER_IMAGE_KEYS)
#: Parameters that ``get_image_features`` uses: the vision tower and its projector / merger.
ENCODER_PARAMETERS = re.compile(r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector)\.")


def supports_shared_images(model: Any) -> bool:
    """Whether ``model`` takes precomputed encoder outputs (transformers >= 5 VLMs such as
    Qwen2-VL and LLaVA do) and exposes ``get_image_features`` to compute them."""
    model = _unwrap_peft(model)
    forward = getattr(model, "forward", None)
    if forward is None or not callable(getattr(model, "get_image_features", None)):
        return False
    try:
        return "mm_encoder_outputs" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def encoder_is_frozen(model: Any) -> bool:
    """True when the model has encoder parameters, none of them trains, and the vision config
    sets no dropout: then an image's encoder output never changes during training."""
    encoder = [p for name, p in model.named_parameters() if ENCODER_PARAMETERS.search(name)]
    if not encoder or any(p.requires_grad for p in encoder):
        return False
    vision_config = getattr(getattr(_unwrap_peft(model), "config", None), "vision_config", None)
    dropouts = [v for k, v in vars(vision_config or object()).items() if "dropout" in k and isinstance(v, float)]
    return all(v == 0 for v in dropouts)


class EncoderCache:
    """Encoder outputs per image set id, on the device they were computed on, up to a budget.

    Set ids come from one ``ItemDataset``, so a cache serves one training run. Once the budget
    is spent, later sets are encoded at every step as usual.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.features: dict[int, tuple[torch.Tensor, ...]] = {}
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, float]:
        return {"encoded": self.misses, "reused": self.hits, "mib": round(self.used_bytes / 2**20, 2)}

    def add(self, set_id: int, features: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in features)
        if self.used_bytes + size <= self.budget_bytes:
            self.features[set_id] = features
            self.used_bytes += size


def distinct_image_sets(
    features: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], torch.Tensor | None, torch.Tensor | None]:
    """(items whose vision tensors to keep, image index, kept sets), or (all items with images,
    None, None) when an item lacks a set id or has vision tensors this module does not know."""
    with_images = [f for f in features if any(k in f for k in VISION_KEYS)]
    unknown = {k for f in with_images for k, v in f.items()
               if isinstance(v, torch.Tensor) and k not in SEQUENCE_KEYS and k not in VISION_KEYS}
    if not with_images or unknown or any(IMAGE_SET_KEY not in f for f in with_images):
        return with_images, None, None
    start: dict[Any, int] = {}
    kept: list[dict[str, Any]] = []
    index: list[int] = []
    rows = 0
    for feature in with_images:
        set_id, count = feature[IMAGE_SET_KEY]
        if set_id not in start:
            start[set_id] = rows
            kept.append(feature)
            rows += count
        index.extend(range(start[set_id], start[set_id] + count))
    sets = torch.tensor([f[IMAGE_SET_KEY] for f in kept], dtype=torch.long)
    return kept, torch.tensor(index, dtype=torch.long), sets


def forward(model: Any, inputs: dict[str, Any], encoder_model: Any | None = None,
            cache: EncoderCache | None = None) -> Any:
    """``model(**inputs)``, encoding each distinct image once when ``inputs`` has an image index.

    ``encoder_model`` is the unwrapped model whose ``get_image_features`` to call when ``model``
    is a DDP wrapper (the wrapper's forward still runs, so gradient hooks work as usual).
    ``cache`` reuses features across calls; pass one only when ``encoder_is_frozen``.
    """
    index = inputs.pop(IMAGE_INDEX_KEY, None)
    sets = inputs.pop(IMAGE_SETS_KEY, None)
    if index is None:
        return model(**inputs)
    encoder_model = encoder_model or model
    pixel_values = inputs.pop("pixel_values")
    per_image = {key: inputs.pop(key) for key in PER_IMAGE_KEYS if key in inputs}
    if cache is None:
        pooled = encoder_model.get_image_features(pixel_values=pixel_values, **per_image, return_dict=True).pooler_output
    else:
        pooled = _cached_features(encoder_model, cache, sets.tolist(), pixel_values, per_image)
    encoder = BaseModelOutputWithPooling(pooler_output=tuple(pooled[i] for i in index.tolist()))
    inputs.update({key: value[index.to(value.device)] for key, value in per_image.items()})
    return model(**inputs, mm_encoder_outputs={"image": encoder})


def _cached_features(encoder_model: Any, cache: EncoderCache, sets: list[list[int]],
                     pixel_values: torch.Tensor, per_image: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-image features of the kept sets, encoding (without grad) only the sets not cached."""
    grid = per_image.get("image_grid_thw")
    # Qwen2-VL packs prod(t, h, w) patch rows per image; other models have one row per image.
    rows = grid.prod(-1).tolist() if grid is not None else [1] * pixel_values.shape[0]
    row_starts = [0, *accumulate(rows)]
    image_starts = [0, *accumulate(count for _, count in sets)]
    missing = [j for j, (set_id, _) in enumerate(sets) if set_id not in cache.features]
    cache.hits += len(sets) - len(missing)
    cache.misses += len(missing)
    computed: dict[int, tuple[torch.Tensor, ...]] = {}
    if missing:
        images = [i for j in missing for i in range(image_starts[j], image_starts[j + 1])]
        pixel_rows = torch.cat([torch.arange(row_starts[i], row_starts[i + 1]) for i in images])
        picked = torch.tensor(images, dtype=torch.long)
        with torch.no_grad():
            encoded = encoder_model.get_image_features(
                pixel_values=pixel_values[pixel_rows.to(pixel_values.device)],
                **{key: value[picked.to(value.device)] for key, value in per_image.items()},
                return_dict=True,
            ).pooler_output
        for j, start in zip(missing, accumulate((sets[j][1] for j in missing), initial=0), strict=False):
            computed[j] = tuple(encoded[start : start + sets[j][1]])
            cache.add(sets[j][0], computed[j])
    return [t for j, (set_id, _) in enumerate(sets) for t in computed.get(j) or cache.features[set_id]]


def _unwrap_peft(model: Any) -> Any:
    if callable(getattr(model, "get_base_model", None)):  # a peft wrapper passes the arguments on
        return model.get_base_model()
    return model
