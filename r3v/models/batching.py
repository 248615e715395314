"""Encode one chat prompt at a time, then pad and stack encodings into model batches.

Encoding each prompt once lets the backend and the trainer measure lengths before batching and
sort by length, without running the processor twice. Collation is model independent: sequence
tensors are padded, every other tensor (pixel_values, image_grid_thw, ...) is concatenated along
the first dimension, which is how both Qwen2-VL and LLaVA batch their vision inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")


def encode(processor, text: str, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Processor output for one prompt, with the batch dimension removed from sequence tensors."""
    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = list(images)
    encoded = processor(**kwargs)
    out = {}
    for key, value in encoded.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key] = value[0] if key in SEQUENCE_KEYS else value
    return out


def pad_value(key: str, pad_token_id: int) -> int:
    if key == "input_ids":
        return pad_token_id
    if key == "labels":
        return -100
    return 0


def collate(features: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str) -> dict[str, torch.Tensor]:
    """Pad sequence tensors to the longest; concatenate the rest along dim 0."""
    longest = max(f["input_ids"].shape[0] for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in SEQUENCE_KEYS:
            fill = pad_value(key, pad_token_id)
            padded = torch.full((len(values), longest), fill, dtype=values[0].dtype)
            for row, value in enumerate(values):
                if padding_side == "left":
                    padded[row, longest - value.shape[0] :] = value
                else:
                    padded[row, : value.shape[0]] = value
            batch[key] = padded
        else:
            batch[key] = torch.cat(values, dim=0)
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
