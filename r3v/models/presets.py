"""Training presets: R3V's published settings per model family, documented defaults for the
families R3V did not publish, and the built-in models' own.

Presets are functions that return a ``TrainConfig``. The family comes from the model's
``config.json`` (``model_type``), never from its path; the families are the table in
``r3v.models.families``. A model folder may also recommend settings for an ``r3v train`` run in an
``r3v.json`` file, in the shape of ``r3v.config.LoopConfig``
(``{"train_preset": "tiny", "sampling": {"max_new_tokens": 64}}``): r3v's built-in models do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from r3v.config import TrainConfig
from r3v.models.families import (
    DEFAULT_LORA,
    FAMILIES,
    QWEN_VL_LORA_TARGET,
    family_by_name,
    family_of_model_type,
    model_type_of,
)

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_SETTINGS_FILE", "PRESETS", "QWEN_VL_LORA_TARGET", "default_preset", "model_family", "model_settings",
    "named_preset", "preset_for_model", "reference_preset", "tiny_preset",
]

#: The presets ``named_preset`` knows by name: tiny, default, and one per family.
PRESETS = ("tiny", "default", *(family.name for family in FAMILIES))
#: The file in which a model folder recommends its run settings.
MODEL_SETTINGS_FILE = "r3v.json"


def reference_preset(model_family: str) -> TrainConfig:
    """A family's settings: LoRA per family, lr 3e-5, 3 epochs, global batch 64, AdamW (0.9, 0.98,
    eps 1e-6), the reference script's dropout, weight decay and warm-up (``REFERENCE_TRAINING``),
    and the family's pixel cap per image.

    LoRA is R3V's published setting where there is one: ``qwen-vl`` (Qwen-VL-Chat, r 64 / alpha
    16), ``llava`` (LLaVA-1.5, r 128 / alpha 256), ``qwen2-vl`` (Qwen2-VL, r 8 / alpha 16), which
    ``qwen2.5-vl`` and ``qwen3-vl`` take too. ``llava-onevision``, ``internvl``, ``smolvlm`` and
    ``gemma3`` have none; they take ``DEFAULT_LORA`` (r 8 / alpha 16, R3V's newest setting), see
    ``r3v.models.families``. The rest is R3V's reference recipe, the same for every family.
    """
    family = family_by_name(model_family)
    if family is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"unknown model family {model_family!r}; known: {known}")
    r, alpha = family.lora
    config = _recipe(r, alpha, family.max_pixels, REFERENCE_TRAINING.get(family.name, REFERENCE_TRAINING["qwen2-vl"]))
    if family.lora_target is not None:
        config.lora_target = family.lora_target
    return config


#: What each reference script set beyond the shared recipe: reference A's scripts/sft_qwenvl.sh and
#: scripts/sft_llava.sh, and reference B's qwen2vl_lora_sft_geoqa.yaml (LLaMA-Factory, whose LoRA
#: dropout defaults to 0). Families R3V published nothing for take reference B's, the newest.
REFERENCE_TRAINING: dict[str, dict[str, float]] = {
    "qwen-vl": {"lora_dropout": 0.05, "weight_decay": 0.05, "warmup_ratio": 0.1, "adam_epsilon": 1e-6},
    "llava": {"lora_dropout": 0.05, "weight_decay": 0.0, "warmup_ratio": 0.03, "adam_epsilon": 1e-6},
    "qwen2-vl": {"lora_dropout": 0.0, "weight_decay": 0.05, "warmup_ratio": 0.1, "adam_epsilon": 1e-6},
}


def default_preset() -> TrainConfig:
    """What a model of a family r3v has no settings for trains with: R3V's recipe with
    ``DEFAULT_LORA`` on the language model's linear layers (found from the model) and the
    processor's own image size (no pixel cap)."""
    return _recipe(*DEFAULT_LORA, None, REFERENCE_TRAINING["qwen2-vl"])


def _recipe(r: int, alpha: int, max_pixels: int | None, optimizer: dict[str, float]) -> TrainConfig:
    # 2 items per device as both reference codes; the global batch of 64 fixes the accumulation
    return TrainConfig(
        lora=True, lora_r=r, lora_alpha=alpha, epochs=3, learning_rate=3e-5, lr_scheduler="constant_with_warmup",
        adam_beta1=0.9, adam_beta2=0.98, batch_size=2, global_batch=64, max_length=2048, max_pixels=max_pixels,
        **optimizer,
    )


def tiny_preset() -> TrainConfig:
    """Settings for the built-in tiny models on a CPU: full fine-tuning of the language model at a
    high rate, few epochs. The image path stays frozen: trained from scratch jointly with the
    language model, the tiny encoder collapses to image-independent features (measured)."""
    return TrainConfig(
        lora=False, freeze_vision_tower=True, freeze_projector=True, learning_rate=1e-3, warmup_ratio=0.05, epochs=2,
        batch_size=16, global_batch=16, max_length=1024, logging_steps=5,
    )


def named_preset(name: str, model: str | None = None) -> TrainConfig:
    """A preset by name; ``auto`` is ``preset_for_model(model)``."""
    if name == "auto":
        if model is None:
            raise ValueError("the auto preset needs the model")
        return preset_for_model(model)
    if name == "tiny":
        return tiny_preset()
    if name == "default":
        return TrainConfig()
    return reference_preset(name)


def model_settings(model: str) -> dict:
    """The run settings a local model folder recommends in ``r3v.json`` (empty for hub ids and other
    folders); ``r3v.loop.resolve_config`` puts them between the defaults and the user's settings."""
    from r3v.models.loading import resolve_model

    path = Path(resolve_model(model)) / MODEL_SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def preset_for_model(model: str) -> TrainConfig:
    """The preset a model folder names in ``r3v.json``, else its family's settings; a model of a
    family r3v does not know trains with ``default_preset`` (said in one log line)."""
    named = model_settings(model).get("train_preset")
    if named:
        return named_preset(named)
    from r3v.models.loading import resolve_model

    model_type = model_type_of(resolve_model(model))
    family = family_of_model_type(model_type)
    if family is None:
        what = f"model type {model_type!r}" if model_type else "a model whose config.json cannot be read"
        log.warning(
            "no r3v settings for %s (%s): training with the default preset, LoRA r %d / alpha %d on its "
            "language model's linear layers, no pixel cap; --preset NAME picks a family's settings",
            what, model, *DEFAULT_LORA,
        )
        return default_preset()
    return reference_preset(family.name)


def model_family(model: str) -> str | None:
    """The r3v family (preset name) of a model, from its config's ``model_type`` (never from its
    path); None for a model type no family lists."""
    from r3v.models.loading import resolve_model

    family = family_of_model_type(model_type_of(resolve_model(model)))
    return family.name if family else None
