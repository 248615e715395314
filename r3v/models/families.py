"""What r3v knows per VLM family, and what it reads from the model itself.

``FAMILIES`` is one table: each family's model types (from ``config.json``), its LoRA setting
and where that comes from, and its visual-token cap for training. Everything else r3v needs
about a model is read from the model object, never from its name:

- the language model is ``model.get_decoder()`` (the decoder stack that owns the token
  embeddings: ``model.language_model`` for most families, ``model.text_model`` for Idefics3 /
  SmolVLM); LoRA goes on its ``nn.Linear`` layers (``lora_target_modules``);
- the image path (vision tower plus projector / merger / connector / newline embedding) is every
  parameter outside the language model and the token embeddings and LM head
  (``image_path_parameters``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Qwen-VL-Chat (remote code): its QWen blocks' attention and MLP projections, as R3V's reference code.
QWEN_VL_LORA_TARGET = r".*transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"

#: LoRA rank / alpha for families R3V published no setting for: its newest published setting
#: (Qwen2-VL's r 8 / alpha 16), which is also the usual LoRA default of alpha = 2r. r3v has not
#: tuned it per family; pass --lora-r / --lora-alpha to change it.
DEFAULT_LORA = (8, 16)


@dataclass(frozen=True)
class Family:
    """One VLM family: the preset ``r3v train --preset NAME`` (or ``auto``) starts from."""

    name: str
    """Preset name, e.g. ``qwen2-vl``."""
    title: str
    model_types: tuple[str, ...]
    """``config.json`` model types that belong to the family."""
    lora: tuple[int, int]
    """LoRA (rank, alpha)."""
    lora_source: str
    """Where the LoRA setting comes from."""
    max_pixels: int | None
    """Pixel cap per image while training and sampling (``set_pixel_cap`` turns it into the
    family's own knob); None where the processor's image tokens are fixed."""
    cap_note: str
    lora_target: str | None = None
    """An explicit LoRA target regex; None: the language model's linear layers, found from the model."""
    aliases: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("qwen-vl", "Qwen-VL-Chat", ("qwen",), (64, 16), "R3V reference (Qwen-VL-Chat)", None,
           "448 px fixed (256 tokens)", QWEN_VL_LORA_TARGET, ("qwen-vl-chat", "qwen")),
    Family("llava", "LLaVA-1.5", ("llava",), (128, 256), "R3V reference (LLaVA-1.5)", None,
           "336 px fixed (576 tokens)", aliases=("llava-1.5", "llava1.5")),
    Family("qwen2-vl", "Qwen2-VL", ("qwen2_vl",), (8, 16), "R3V reference (Qwen2-VL)", 768 * 768,
           "768x768 pixels, the R3V GeoQA reference (about 750 tokens of 28 px)", aliases=("qwen2_vl",)),
    Family("qwen2.5-vl", "Qwen2.5-VL", ("qwen2_5_vl",), (8, 16), "R3V reference for Qwen2-VL", 768 * 768,
           "768x768 pixels, as Qwen2-VL (same 28 px tokens)", aliases=("qwen2_5_vl",)),
    Family("qwen3-vl", "Qwen3-VL", ("qwen3_vl",), (8, 16), "R3V reference for Qwen2-VL", 896 * 896,
           "896x896 pixels: 784 tokens of 32 px, about the Qwen2-VL reference's token count", aliases=("qwen3_vl",)),
    Family("llava-onevision", "LLaVA-OneVision", ("llava_onevision",), DEFAULT_LORA, "r3v default", 384 * 384,
           "384x384 pixels: the base crop only (about 1,500 tokens) instead of an anyres grid of up to 9 crops",
           aliases=("llava_onevision",)),
    Family("internvl", "InternVL3", ("internvl",), DEFAULT_LORA, "r3v default", 4 * 448 * 448,
           "4 tiles of 448 px plus the thumbnail (1,280 tokens) instead of up to 12", aliases=("internvl3",)),
    Family("smolvlm", "SmolVLM / Idefics3", ("idefics3", "smolvlm"), DEFAULT_LORA, "r3v default", 768 * 768,
           "longest edge 768 px: 2x2 crops plus the global image", aliases=("idefics3", "smolvlm2")),
    Family("gemma3", "Gemma 3", ("gemma3",), DEFAULT_LORA, "r3v default", None,
           "896 px fixed (256 tokens)", aliases=("gemma-3",)),
)

_BY_NAME = {alias: family for family in FAMILIES for alias in (family.name, *family.aliases)}
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_by_name(name: str) -> Family | None:
    """A family by preset name or alias (case-insensitive), e.g. ``LLaVA-1.5``."""
    return _BY_NAME.get(name.lower())


def family_of_model_type(model_type: str | None) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type or "")


def model_type_of(path: str) -> str | None:
    """``model_type`` from a model's ``config.json`` (a local folder, or a hub id already in the
    local cache), read as JSON: no model code runs, so remote-code models are read too."""
    file = Path(path) / "config.json"
    if not file.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            found = None
        if not found:
            return None
        file = Path(found)
    try:
        return json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Reading the model
# ---------------------------------------------------------------------------------------------

#: Module names of vision encoders, used only to keep LoRA out of one when a model has no separate
#: decoder module (remote-code models whose decoder owns the vision tower, as Qwen-VL-Chat's does).
_VISION_MODULE = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder)(\.|$)")


def unwrap(model: Any) -> Any:
    """The transformers model under a peft (or DDP) wrapper."""
    while True:
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "get_decoder"):
            model = model.module
        else:
            return model


def language_model(model: Any) -> Any:
    """The model's language model: ``get_decoder()`` (transformers' own lookup: the
    ``language_model`` / ``text_model`` / ``decoder`` submodule); for a model whose lookup returns
    the model itself, the module that owns the token embeddings."""
    model = unwrap(model)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is not None and decoder is not model and decoder is not getattr(model, "base_model", None):
        return decoder
    embeddings = model.get_input_embeddings()
    owner = model
    for name, module in model.named_modules():
        if any(child is embeddings for child in module.children()) and name:
            owner = module
    return owner


def module_name(model: Any, module: Any) -> str:
    """The dotted name of ``module`` inside ``model`` ("" for the model itself)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def lora_target_modules(model: Any) -> list[str]:
    """Full names of the language model's ``nn.Linear`` layers (the LM head excluded, as it sits
    outside the decoder): where LoRA goes unless ``lora_target`` names modules itself."""
    import torch

    base = unwrap(model)
    decoder = language_model(base)
    prefix = module_name(base, decoder)
    names = []
    for name, module in decoder.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(module, torch.nn.Linear) and not _VISION_MODULE.search(full):
            names.append(full)
    if not names:
        raise ValueError(f"{type(base).__name__}'s language model ({type(decoder).__name__}) has no linear layers for LoRA")
    return names


def lora_target_regex(model: Any) -> str:
    """A regex that peft full-matches against module names, hitting exactly ``lora_target_modules``:
    the decoder's prefix and the linear layers' own names (q_proj, ..., down_proj), so the adapter
    config stays short for models with many layers."""
    names = lora_target_modules(model)
    base = unwrap(model)
    prefix = module_name(base, language_model(base))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    head = re.escape(prefix) + r"\." if prefix else ""
    pattern = head + r"(.*\.)?(" + "|".join(re.escape(leaf) for leaf in leaves) + ")"
    matched = [n for n, m in base.named_modules() if re.fullmatch(pattern, n) and n]
    if sorted(matched) != sorted(names):  # a leaf name reused elsewhere under the decoder: list them all
        return "^(" + "|".join(re.escape(name) for name in names) + ")$"
    return pattern


def image_path_parameters(model: Any) -> list[tuple[str, Any]]:
    """(name, parameter) of everything ``get_image_features`` uses: the parameters outside the
    language model, the token embeddings and the LM head (vision tower, projector, merger,
    connector, LLaVA-OneVision's newline embedding). Names are the wrapped model's own."""
    base = unwrap(model)
    text = {id(p) for p in language_model(base).parameters()}
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        if module is not None:
            text |= {id(p) for p in module.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in text]
