"""Encode one chat prompt at a time, then pad and stack encodings into model batches.

Encoding each prompt once lets the backend and the trainer measure lengths before batching and
sort by length, without running the processor twice. Collation is model independent: sequence
tensors are padded, every other tensor (pixel_values, image_grid_thw, ...) is concatenated along
the first dimension, which is how the supported VLMs batch their vision inputs. Two family layouts
are normalised for that: Idefics3 / SmolVLM put a prompt's images (crops) on a second dimension
(``_one_image_per_row`` moves them to rows), and LLaVA-OneVision's crops per image and Idefics3's
image sizes vary, so rows are zero-padded to the batch's largest before concatenation, as the
processors pad a batch themselves (``concat_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")


def encode(processor, text: str, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Processor output for one prompt, with the batch dimension removed from sequence tensors.

    Images above the processor's r3v pixel cap are downscaled first (``fit_image``: the anyres
    families, whose cap is not a processor setting).
    """
    from r3v.models.processors import fit_image

    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = [fit_image(processor, image) for image in images]
    encoded = processor(**kwargs)
    out = {}
    for key, value in encoded.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key] = value[0] if key in SEQUENCE_KEYS else value
    return _one_image_per_row(out)


def _one_image_per_row(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Idefics3 / SmolVLM return ``pixel_values`` as (prompts, images, C, H, W) with a
    ``pixel_attention_mask`` of (prompts, images, H, W); their model flattens the first two
    dimensions itself, so one prompt's images may as well be rows (images, 1, ...), which
    concatenate along dim 0 like every other family's vision tensors."""
    pixels, mask = features.get("pixel_values"), features.get("pixel_attention_mask")
    if pixels is None or mask is None or pixels.dim() != 5 or mask.dim() != 4 or pixels.shape[:2] != mask.shape[:2]:
        return features
    return {**features, "pixel_values": pixels.reshape(-1, 1, *pixels.shape[2:]),
            "pixel_attention_mask": mask.reshape(-1, 1, *mask.shape[2:])}


def concat_rows(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dimensions to the largest (LLaVA-OneVision's
    crops per image, Idefics3's image sizes): the models ignore the padding, as they do when the
    processor pads a batch."""
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) <= 1:
        return torch.cat(list(values), dim=0)
    if len({v.dim() for v in values}) != 1:
        raise ValueError(f"cannot batch vision tensors of shapes {sorted(shapes)}")
    largest = [max(dims) for dims in zip(*shapes, strict=True)]
    padded = []
    for value in values:
        out = value.new_zeros((value.shape[0], *largest))
        out[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
        padded.append(out)
    return torch.cat(padded, dim=0)


def pad_value(key: str, pad_token_id: int) -> int:
    if key == "input_ids":
        return pad_token_id
    if key == "labels":
        return -100
    return 0


def collate(features: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str) -> dict[str, torch.Tensor]:
    """Pad sequence tensors to the longest; concatenate the rest along dim 0.

    Keys come from every feature, not the first alone: a text-only prompt has no vision tensors,
    and a batch it opens must still carry the other prompts' images. A sequence tensor a feature
    lacks (token types of a text-only prompt) is zeros there: text.
    """
    longest = max(f["input_ids"].shape[0] for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(key for feature in features for key in feature):
        if key in SEQUENCE_KEYS:
            fill = pad_value(key, pad_token_id)
            dtype = next(f[key].dtype for f in features if key in f)
            padded = torch.full((len(features), longest), fill, dtype=dtype)
            for row, feature in enumerate(features):
                length = feature["input_ids"].shape[0]
                value = feature[key] if key in feature else torch.zeros(length, dtype=dtype)
                if padding_side == "left":
                    padded[row, longest - length :] = value
                else:
                    padded[row, :length] = value
            batch[key] = padded
        else:
            batch[key] = concat_rows([f[key] for f in features if key in f])
    return batch


def batches_by_token_budget(lengths: Sequence[int], budget: int, cost_per_item: int = 0) -> list[list[int]]:
    """Group indices, shortest first, so each group's padded size stays within ``budget`` tokens.

    A group costs ``len(group) * (longest + cost_per_item)``; an item larger than the budget
    forms a group alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max([lengths[i] for i in current] + [lengths[index]])
        if current and (len(current) + 1) * (longest + cost_per_item) > budget:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups
