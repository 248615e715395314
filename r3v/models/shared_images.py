"""Encode each image once: per batch always, and once per run while the encoder is frozen.

An R3V mixture holds several items per question (direct answer, CoT, self-refine, self-select),
all showing the same image, so a batch often carries one image several times. The collator
keeps the vision tensors of each distinct image set once, with the ids of those sets and an
index that lists, unit by unit in item order, which distinct unit each item shows.
``forward`` encodes the distinct images with the model's own ``get_image_features`` and passes
the outputs, repeated in item order, through transformers' ``mm_encoder_outputs`` argument.
Autograd sums the repeated outputs' gradients back into the one encoder pass, so loss and
gradients are those of the plain forward, also when the encoder trains.

A *unit* is one entry of the encoder's output: an image for Qwen2-VL / Qwen2.5-VL / Qwen3-VL
(whose ``pixel_values`` rows are patches, grouped per image by ``image_grid_thw``), LLaVA,
LLaVA-OneVision and Gemma 3; a tile for InternVL, which cuts an image into several rows; a crop
for Idefics3 / SmolVLM, which splits an image. Everywhere but the Qwen families a unit is one
``pixel_values`` row. The repeated output keeps the container the model's own
``get_image_features`` returns (a tensor for Gemma 3 and InternVL, whose forward calls ``.to()``
on it; tuples or lists elsewhere), and Qwen3-VL's ``deepstack_features`` are repeated with it.

When nothing in the encoder trains (LoRA on the language model, R3V's setting) and it has no
dropout, an image's features are the same at every step, so an ``EncoderCache`` keeps them
across steps and epochs, up to a memory budget. tests/test_shared_images.py and
tests/test_families.py check both paths against the plain forward for every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from r3v.models.batching import SEQUENCE_KEYS
from r3v.models.families import image_path_parameters, unwrap

#: Per-item feature set by ``ItemDataset``: (id of the item's image set, number of encoder units in it).
IMAGE_SET_KEY = "image_set"
#: Batch entry: for each encoder unit of each item, in order, its row among the distinct units.
IMAGE_INDEX_KEY = "image_index"
#: Batch entry: (set id, number of units) of each distinct image set, in the order kept.
IMAGE_SETS_KEY = "image_sets"
#: Vision tensors with one entry per unit: ``image_grid_thw`` (Qwen, per image), LLaVA-OneVision's
#: ``image_sizes`` and ``batch_num_images`` (per image: r3v hands the processor a prompt's images
#: as a flat list, which it counts as one image per sample, in its tokens and in the model alike),
#: Idefics3's ``pixel_attention_mask`` (per crop).
PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes", "batch_num_images", "pixel_attention_mask")
VISION_KEYS = ("pixel_values", *PER_IMAGE_KEYS)
#: Fields of the encoder output the models' forwards read: one entry per unit, and one per
#: deepstack layer holding one entry per unit (Qwen3-VL).
DEEPSTACK_FIELD = "deepstack_features"


def encoder_units(features: dict[str, torch.Tensor]) -> int:
    """How many encoder output units one item's vision tensors make (see the module docstring)."""
    grid = features.get("image_grid_thw")
    return int(grid.shape[0]) if grid is not None else int(features["pixel_values"].shape[0])


def supports_shared_images(model: Any) -> bool:
    """Whether ``model`` takes precomputed encoder outputs (transformers >= 5 VLMs such as
    Qwen2-VL and LLaVA do) and exposes ``get_image_features`` to compute them."""
    model = unwrap(model)
    forward = getattr(model, "forward", None)
    if forward is None or not callable(getattr(model, "get_image_features", None)):
        return False
    try:
        return "mm_encoder_outputs" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def encoder_is_frozen(model: Any) -> bool:
    """True when the model has an image path (``r3v.models.families.image_path_parameters``), none
    of it trains, and the vision config sets no dropout: then an image's encoder output never
    changes during training."""
    encoder = [p for _, p in image_path_parameters(model)]
    if not encoder or any(p.requires_grad for p in encoder):
        return False
    vision_config = getattr(getattr(unwrap(model), "config", None), "vision_config", None)
    dropouts = [v for k, v in vars(vision_config or object()).items() if "dropout" in k and isinstance(v, float)]
    return all(v == 0 for v in dropouts)


@dataclass(frozen=True)
class OutputLayout:
    """How a model's ``get_image_features`` packs its units, to rebuild that output for the forward."""

    output_class: type
    container: Any
    """``torch.Tensor`` (units stacked on dim 0), or the sequence type (tuple, list) of per-unit tensors."""
    deepstack_layers: int | None


class EncoderCache:
    """Encoder outputs per image set id, on the device they were computed on, up to a budget.

    Set ids come from one ``ItemDataset``, so a cache serves one training run. Once the budget
    is spent, later sets are encoded at every step as usual.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.features: dict[int, tuple[tuple[torch.Tensor, ...], ...]] = {}
        self.layout: OutputLayout | None = None
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, float]:
        return {"encoded": self.misses, "reused": self.hits, "mib": round(self.used_bytes / 2**20, 2)}

    def add(self, set_id: int, units: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        size = sum(t.numel() * t.element_size() for unit in units for t in unit)
        if self.used_bytes + size <= self.budget_bytes:
            self.features[set_id] = units
            self.used_bytes += size


def distinct_image_sets(
    features: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], torch.Tensor | None, torch.Tensor | None]:
    """(items whose vision tensors to keep, unit index, kept sets), or (all items with images,
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
        output = encoder_model.get_image_features(pixel_values=pixel_values, **per_image, return_dict=True)
        layout = _layout(output)
        units = _units(output, layout)
    else:
        units, layout = _cached_units(encoder_model, cache, sets.tolist(), pixel_values, per_image)
    encoder = _join([units[i] for i in index.tolist()], layout)
    # per-image entries follow their units into item order (Qwen's M-RoPE reads image_grid_thw)
    inputs.update({key: value[index.to(value.device)] for key, value in per_image.items()})
    return model(**inputs, mm_encoder_outputs={"image": encoder})


def _layout(output: Any) -> OutputLayout:
    pooled = output.pooler_output
    container = torch.Tensor if isinstance(pooled, torch.Tensor) else type(pooled)
    deepstack = getattr(output, DEEPSTACK_FIELD, None)
    return OutputLayout(type(output), container, None if deepstack is None else len(deepstack))


def _units(output: Any, layout: OutputLayout) -> list[tuple[torch.Tensor, ...]]:
    """One tuple per unit: its pooled features, then its features in each deepstack layer."""
    pooled = list(output.pooler_output)
    layers = [list(layer) for layer in getattr(output, DEEPSTACK_FIELD, None) or ()]
    if any(len(layer) != len(pooled) for layer in layers):
        raise ValueError(f"{DEEPSTACK_FIELD} and pooler_output disagree on the number of images")
    return [(unit, *(layer[i] for layer in layers)) for i, unit in enumerate(pooled)]


def _join(units: Sequence[tuple[torch.Tensor, ...]], layout: OutputLayout) -> Any:
    """The model's own output type, holding ``units`` in order."""
    def pack(tensors: list[torch.Tensor]) -> Any:
        return torch.stack(tensors) if layout.container is torch.Tensor else layout.container(tensors)

    fields: dict[str, Any] = {"pooler_output": pack([unit[0] for unit in units])}
    if layout.deepstack_layers is not None:
        fields[DEEPSTACK_FIELD] = [tuple(unit[1 + layer] for unit in units) for layer in range(layout.deepstack_layers)]
    return layout.output_class(**fields)


def _cached_units(encoder_model: Any, cache: EncoderCache, sets: list[list[int]], pixel_values: torch.Tensor,
                  per_image: dict[str, torch.Tensor]) -> tuple[list[tuple[torch.Tensor, ...]], OutputLayout]:
    """Units of the kept sets, encoding (without grad) only the sets not cached."""
    grid = per_image.get("image_grid_thw")
    # Qwen packs prod(t, h, w) patch rows per image; other models have one row per unit.
    rows = grid.prod(-1).tolist() if grid is not None else [1] * pixel_values.shape[0]
    row_starts = [0, *accumulate(rows)]
    unit_starts = [0, *accumulate(count for _, count in sets)]
    missing = [j for j, (set_id, _) in enumerate(sets) if set_id not in cache.features]
    cache.hits += len(sets) - len(missing)
    cache.misses += len(missing)
    computed: dict[int, tuple[tuple[torch.Tensor, ...], ...]] = {}
    if missing:
        units = [i for j in missing for i in range(unit_starts[j], unit_starts[j + 1])]
        pixel_rows = torch.cat([torch.arange(row_starts[i], row_starts[i + 1]) for i in units])
        picked = torch.tensor(units, dtype=torch.long)
        with torch.no_grad():
            output = encoder_model.get_image_features(
                pixel_values=pixel_values[pixel_rows.to(pixel_values.device)],
                **{key: value[picked.to(value.device)] for key, value in per_image.items()},
                return_dict=True,
            )
        cache.layout = cache.layout or _layout(output)
        encoded = _units(output, cache.layout)
        for j, start in zip(missing, accumulate((sets[j][1] for j in missing), initial=0), strict=False):
            computed[j] = tuple(encoded[start : start + sets[j][1]])
            cache.add(sets[j][0], computed[j])
    assert cache.layout is not None  # a set is only ever cached after an encoding set the layout
    units = [unit for j, (set_id, _) in enumerate(sets) for unit in computed.get(j) or cache.features[set_id]]
    return units, cache.layout
