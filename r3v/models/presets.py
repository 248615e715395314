"""Training presets: R3V's published settings per model family, and the built-in models' own.

Presets are functions that return a ``TrainConfig``. The family comes from the model's
``config.json`` (``model_type``), never from its path. A model folder may also recommend settings
for an ``r3v train`` run in an ``r3v.json`` file, in the shape of ``r3v.config.LoopConfig``
(``{"train_preset": "tiny", "sampling": {"max_new_tokens": 64}}``): r3v's built-in models do.
"""

from __future__ import annotations

import json
from pathlib import Path

from r3v.config import TrainConfig

QWEN_VL_LORA_TARGET = r".*transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"

# LoRA rank / alpha / target per model family, from the R3V reference code.
REFERENCE_LORA = {
    "qwen-vl": (64, 16, QWEN_VL_LORA_TARGET),
    "llava": (128, 256, None),
    "qwen2-vl": (8, 16, None),
}
#: Image pixel cap per family: the Qwen2-VL reference (GeoQA) trained on images of at most 768x768.
REFERENCE_MAX_PIXELS = {"qwen2-vl": 768 * 768}
FAMILY_ALIASES = {
    "qwen-vl-chat": "qwen-vl", "qwen": "qwen-vl", "llava-1.5": "llava", "llava1.5": "llava",
    "qwen2_vl": "qwen2-vl", "qwen2.5-vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl",
}

#: The presets ``preset_for_model`` knows by name.
PRESETS = ("tiny", "default", "qwen-vl", "llava", "qwen2-vl")
#: The file in which a model folder recommends its run settings.
MODEL_SETTINGS_FILE = "r3v.json"


def reference_preset(model_family: str) -> TrainConfig:
    """R3V's published settings: LoRA per family, lr 3e-5, 3 epochs, global batch 64, AdamW (0.9, 0.98).

    Families: ``qwen-vl`` (Qwen-VL-Chat, r 64 / alpha 16), ``llava`` (LLaVA-1.5, r 128 / alpha 256),
    ``qwen2-vl`` (Qwen2-VL / Qwen2.5-VL, r 8 / alpha 16).
    """
    family = FAMILY_ALIASES.get(model_family.lower(), model_family.lower())
    if family not in REFERENCE_LORA:
        raise ValueError(f"unknown model family {model_family!r}; known: {', '.join(REFERENCE_LORA)}")
    r, alpha, target = REFERENCE_LORA[family]
    # 2 items per device as both reference codes; the global batch of 64 fixes the accumulation
    config = TrainConfig(
        lora=True, lora_r=r, lora_alpha=alpha, epochs=3, learning_rate=3e-5, warmup_ratio=0.05,
        lr_scheduler="constant_with_warmup", adam_beta1=0.9, adam_beta2=0.98, batch_size=2,
        global_batch=64, max_length=2048, max_pixels=REFERENCE_MAX_PIXELS.get(family),
    )
    if target is not None:
        config.lora_target = target
    return config


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
    """The preset a model folder names in ``r3v.json``, else R3V's settings for the model's family."""
    named = model_settings(model).get("train_preset")
    if named:
        return named_preset(named)
    return reference_preset(model_family(model))


def model_family(model: str) -> str:
    """The R3V family of a model, from its config's ``model_type`` (never from its path)."""
    from transformers import AutoConfig

    from r3v.models.loading import resolve_model

    model_type = AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=False).model_type
    families = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl", "llava": "llava", "qwen": "qwen-vl"}
    if model_type not in families:
        raise ValueError(f"no R3V reference settings for model type {model_type!r}; pass a TrainConfig")
    return families[model_type]
