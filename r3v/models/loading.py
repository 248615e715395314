"""Load a VLM and its processor from a hub id, a local folder, or a built-in model name
(the tiny test models, built on first use; the demo's base model, shipped in ``r3v/assets``).
Processors come from ``r3v.models.processors``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText

from r3v.models.processors import load_processor, set_pixel_cap
from r3v.models.tiny import TINY_MODELS, built_in_models, tiny_model_path

log = logging.getLogger(__name__)

#: Models that ship as package data (``r3v/assets``): the built-in demo's base models.
SHIPPED_MODELS = {
    name: Path(__file__).resolve().parents[1] / "assets" / name for name in ("r3v-grid-base", "r3v-clevr-base")
}

__all__ = ["SHIPPED_MODELS", "LoadedModel", "built_in_models", "load_model", "pick_device_and_dtype", "resolve_model"]


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    path: str
    adapter: str | None
    device: str
    dtype: Any


def resolve_model(name_or_path: str) -> str:
    """A local folder for built-in names; anything else is passed through (hub id or path)."""
    if name_or_path in TINY_MODELS:
        return str(tiny_model_path(name_or_path))
    if name_or_path in SHIPPED_MODELS:
        return str(SHIPPED_MODELS[name_or_path])
    return name_or_path


def pick_device_and_dtype(device: str | None = None, dtype: str | None = None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None or dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    return device, torch_dtype


def load_model(
    name_or_path: str,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    max_pixels: int | None = None,
) -> LoadedModel:
    """Load model and processor; apply a PEFT adapter when given. Weights load from safetensors only.

    ``max_pixels`` caps the pixels per image the processor keeps (see ``set_pixel_cap``).
    """
    path = resolve_model(name_or_path)
    device, torch_dtype = pick_device_and_dtype(device, dtype)
    processor = load_processor(path, trust_remote_code)
    if max_pixels is not None:
        set_pixel_cap(processor, max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, processor, name_or_path, path, adapter, device, torch_dtype)
