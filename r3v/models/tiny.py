"""Tiny vision-language models built offline from a config, with the real HF classes.

They exist so that every code path (loading, chat templates, generation, LoRA, training) runs
on a CPU without a hub download, for every model family r3v supports. Each built-in model is the
family's real ``...ForConditionalGeneration`` class with random weights, its real processor class
(with the PIL image processor, so no torchvision is needed), a byte-level BPE tokenizer trained
here with ``tokenizers`` that carries the family's special tokens, and a minimal chat template in
the family's own format (its turn markers and image placeholder). The folder is written with
``save_pretrained`` and loads through ``r3v.models.loading.load_model`` as a hub checkpoint does.

One table, ``TINY_SPECS``, describes every model; ``build_tiny_model`` is the only builder. In a
spec's config, any string that names one of the spec's special tokens stands for that token's id,
and ``VOCAB`` for the tokenizer's size, so the table holds no ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# ChatML turns; images become the model's placeholder. Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL
# and the tiny LLaVA use it (Qwen's own templates add a default system turn; these leave it out).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

# LLaVA-OneVision (llava-hf): ChatML turns, "role " then the turn's images, then "\n" + each text.
# (The newlines are Jinja strings: the renderer trims a literal newline that follows a block tag.)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Idefics3 / SmolVLM: one <|im_start|>, then "User:" / "Assistant:" turns closed by <end_of_utterance>;
# a turn that opens with an image takes no space after the colon.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Gemma 3: <bos>, then <start_of_turn>user / model turns closed by <end_of_turn>; images are <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: Stands for the tokenizer's size in a spec's config.
VOCAB = "<vocab_size>"

CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Idefics3 marks each crop of a split image with its row and column (up to 6 x 6).
IDEFICS3_GRID_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


def _text(model_type: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The tiny language model every new family shares: 64 wide, 2 layers, 4 heads of 16."""
    config = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
        "pad_token_id": "<|endoftext|>",
    }
    if model_type:
        config["model_type"] = model_type
    return {**config, **overrides}


#: M-RoPE for 16-wide heads: the sections must sum to head_dim / 2.
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
#: What every Qwen VL config names by token, and its chat format.
_QWEN_TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                   "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                   "tie_word_embeddings": True}
_QWEN_FORMAT = {"special_tokens": tuple(QWEN_SPECIAL_TOKENS), "template": CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", QWEN_IMAGE)}
#: The tiny vision towers of the Qwen2.5-VL / Qwen3-VL specs, and the SigLIP tower of Gemma 3 and
#: LLaVA-OneVision: 32 wide, 2 layers, 56 px images of 14 px patches.
_QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                "spatial_merge_size": 2, "temporal_patch_size": 2}
_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "vision_use_head": False}


@dataclass(frozen=True)
class TinySpec:
    """One built-in model: everything ``build_tiny_model`` needs, as data."""

    name: str
    description: str
    model_class: str
    """A transformers class name, e.g. ``Qwen3VLForConditionalGeneration``."""
    processor_class: str
    image_processor: tuple[str, dict[str, Any]]
    """PIL image processor class name and its arguments."""
    special_tokens: tuple[str, ...]
    template: str
    config: dict[str, Any]
    """Config arguments (``model_type`` picks the class); token names stand for their ids."""
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer_roles: dict[str, str] = field(
        default_factory=lambda: {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    )
    """eos / pad / bos tokens, and named tokens the processor reads from the tokenizer
    (``image_token``, ...: transformers' ``extra_special_tokens``)."""
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    """What ``generation_config.eos_token_id`` lists: the tokens that end an assistant turn."""
    pad_token: str = "<|endoftext|>"


TINY_SPECS: dict[str, TinySpec] = {
    spec.name: spec
    for spec in (
        TinySpec(
            name="tiny-qwen2-vl",
            description="Qwen2-VL (Qwen2VLForConditionalGeneration), ChatML, 16 image tokens per 112 px image",
            model_class="Qwen2VLForConditionalGeneration",
            processor_class="Qwen2VLProcessor",
            # 56x56..112x112 pixels: a 112 px image becomes 4x4 = 16 merged image tokens.
            image_processor=("Qwen2VLImageProcessorPil", {"min_pixels": 56 * 56, "max_pixels": 112 * 112}),
            **_QWEN_FORMAT,
            config={
                "model_type": "qwen2_vl",
                # Heads are 32 wide, so M-RoPE's sections sum to 16 (not the 64 of head_dim 128).
                "text_config": _text(hidden_size=128, intermediate_size=256, head_dim=32, rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
                "vision_config": {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2,
                                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
                **_QWEN_TOKEN_IDS,
            },
        ),
        TinySpec(
            name="tiny-llava",
            description="LLaVA-1.5 layout (LlavaForConditionalGeneration: CLIP tower, Qwen2 text), ChatML, 16 image tokens",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            image_processor=("CLIPImageProcessorPil", {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}),
            special_tokens=tuple(LLAVA_SPECIAL_TOKENS),
            template=CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>"),
            config={
                "model_type": "llava",
                "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                                  "projection_dim": 64},
                "text_config": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "max_position_embeddings": 2048, "tie_word_embeddings": True,
                                "bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"},
                "image_token_id": "<image>", "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
                "projector_hidden_act": "gelu", "tie_word_embeddings": True,
            },
            processor_kwargs={"patch_size": 14, "vision_feature_select_strategy": "default", "image_token": "<image>",
                              "num_additional_image_tokens": 1},
        ),
        TinySpec(
            name="tiny-qwen2.5-vl",
            description="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, windowed vision attention), ChatML, 16 image tokens",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            image_processor=("Qwen2VLImageProcessorPil", {"min_pixels": 56 * 56, "max_pixels": 112 * 112}),
            **_QWEN_FORMAT,
            config={
                "model_type": "qwen2_5_vl",
                "text_config": _text(rope_parameters=_MROPE),
                "vision_config": {**_QWEN_VISION, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]},
                **_QWEN_TOKEN_IDS,
            },
        ),
        TinySpec(
            name="tiny-qwen3-vl",
            description="Qwen3-VL (Qwen3VLForConditionalGeneration, DeepStack features), ChatML, 16 image tokens of 32 px",
            model_class="Qwen3VLForConditionalGeneration",
            processor_class="Qwen3VLProcessor",
            # Qwen3-VL patches are 16 px, merged 2x2: a 112 px image is resized to 128 px, 4x4 tokens.
            image_processor=("Qwen2VLImageProcessorPil", {
                "min_pixels": 64 * 64, "max_pixels": 128 * 128, "patch_size": 16, "merge_size": 2,
                "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
            **_QWEN_FORMAT,
            config={
                "model_type": "qwen3_vl",
                "text_config": _text(rope_parameters={**_MROPE, "mrope_interleaved": True}),
                "vision_config": {**_QWEN_VISION, "patch_size": 16, "num_position_embeddings": 64,
                                  "deepstack_visual_indexes": [0]},
                **_QWEN_TOKEN_IDS,
            },
        ),
        TinySpec(
            name="tiny-internvl",
            description="InternVL3 (InternVLForConditionalGeneration), ChatML, 56 px tiles (a 112 px image: 4 + thumbnail)",
            model_class="InternVLForConditionalGeneration",
            processor_class="InternVLProcessor",
            image_processor=("GotOcr2ImageProcessorPil", {
                "size": {"height": 56, "width": 56}, "crop_to_patches": True, "min_patches": 1, "max_patches": 4}),
            special_tokens=(*CHATML_TOKENS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
            template=CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>\n"),
            config={
                "model_type": "internvl",
                "text_config": _text("qwen2"),
                # 56 px tiles of 14 px patches, pixel-shuffled by 0.5: 4 tokens per tile.
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": [56, 56], "patch_size": [14, 14]},
                "image_token_id": "<IMG_CONTEXT>", "image_seq_length": 4, "downsample_ratio": 0.5,
                "tie_word_embeddings": True,
            },
            processor_kwargs={"image_seq_length": 4},
            tokenizer_roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "start_image_token": "<img>",
                             "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                             "video_token": "<video>"},
        ),
        TinySpec(
            name="tiny-smolvlm",
            description="SmolVLM (Idefics3ForConditionalGeneration), User:/Assistant: turns, images split into 56 px crops",
            model_class="Idefics3ForConditionalGeneration",
            processor_class="Idefics3Processor",
            # Longest edge 112 px, cut into 56 px crops: a 112 px image is 2x2 crops plus the global view.
            image_processor=("Idefics3ImageProcessorPil", {
                "size": {"longest_edge": 112}, "max_image_size": {"longest_edge": 56}, "do_image_splitting": True}),
            special_tokens=(*CHATML_TOKENS, "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                            "<global-img>", *IDEFICS3_GRID_TOKENS),
            template=IDEFICS3_TEMPLATE,
            config={
                "model_type": "idefics3",
                "text_config": _text("llama", eos_token_id="<end_of_utterance>"),
                # 56 px crops of 14 px patches, shuffled by a scale factor of 2: 4 tokens per crop.
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
                "image_token_id": "<image>", "scale_factor": 2, "tie_word_embeddings": True,
            },
            processor_kwargs={"image_seq_len": 4},
            tokenizer_roles={"eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>"},
            stop_tokens=("<end_of_utterance>",),
        ),
        TinySpec(
            name="tiny-gemma3",
            description="Gemma 3 (Gemma3ForConditionalGeneration: SigLIP tower), <start_of_turn> turns, 4 image tokens",
            model_class="Gemma3ForConditionalGeneration",
            processor_class="Gemma3Processor",
            image_processor=("Gemma3ImageProcessorPil", {"size": {"height": 56, "width": 56}}),
            special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                            "<end_of_image>", "<image_soft_token>"),
            template=GEMMA3_TEMPLATE,
            config={
                "model_type": "gemma3",
                "text_config": _text("gemma3_text", bos_token_id="<bos>", eos_token_id=["<eos>", "<end_of_turn>"],
                                     pad_token_id="<pad>", query_pre_attn_scalar=16, sliding_window=512,
                                     layer_types=["sliding_attention", "full_attention"]),
                # 56 px images of 14 px patches (4x4), pooled to 2x2 = 4 soft tokens per image.
                "vision_config": _SIGLIP,
                "mm_tokens_per_image": 4, "boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                "image_token_index": "<image_soft_token>", "tie_word_embeddings": True,
            },
            processor_kwargs={"image_seq_length": 4},
            tokenizer_roles={"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>",
                             "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                             "image_token": "<image_soft_token>"},
            stop_tokens=("<eos>", "<end_of_turn>"),
            pad_token="<pad>",
        ),
        TinySpec(
            name="tiny-llava-onevision",
            description="LLaVA-OneVision (LlavaOnevisionForConditionalGeneration: SigLIP, anyres 56 px grid), ChatML",
            model_class="LlavaOnevisionForConditionalGeneration",
            processor_class="LlavaOnevisionProcessor",
            image_processor=("LlavaOnevisionImageProcessorPil", {
                "size": {"height": 56, "width": 56},
                "image_grid_pinpoints": [[56, 56], [56, 112], [112, 56], [112, 112]]}),
            special_tokens=(*CHATML_TOKENS, "<image>", "<video>"),
            template=ONEVISION_TEMPLATE,
            config={
                "model_type": "llava_onevision",
                "text_config": _text("qwen2"),
                "vision_config": _SIGLIP,
                "image_token_index": "<image>", "video_token_index": "<video>",
                "vision_feature_select_strategy": "full", "vision_feature_layer": -1,
                "image_grid_pinpoints": [[56, 56], [56, 112], [112, 56], [112, 112]],
                "tie_word_embeddings": True,
            },
            # 56 px crops of 14 px patches: 16 tokens per crop (SigLIP has no CLS token: "full").
            processor_kwargs={"num_image_tokens": 16, "vision_feature_select_strategy": "full"},
            tokenizer_roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<image>",
                             "video_token": "<video>"},
        ),
    )
}

#: Names ``load_model`` and every CLI accept as a built-in model.
TINY_MODELS = tuple(TINY_SPECS)
#: What the built-in models recommend for an ``r3v train`` run (``r3v.json``, see
#: ``r3v.models.presets``): the tiny trainer preset, and a 64-token limit (clevr-synth rationales
#: are about 30 tokens; a tiny model's longer rambles only cost time).
BUILT_IN_SETTINGS = {"train_preset": "tiny", "sampling": {"max_new_tokens": 64}}
BUILD_VERSION = "2"
#: The built-in tasks' base models, shipped as package data (``r3v.models.loading.SHIPPED_MODELS``).
SHIPPED_DESCRIPTIONS = {
    "r3v-clevr-base": "clevr-synth's base model: tiny-qwen2-vl warmed up on clevr-synth (shipped in r3v/assets)",
    "r3v-grid-base": "the demo's base model: a Qwen2-VL (4 x 128) for grid-count that reads and marks every row "
                     "(shipped in r3v/assets)",
}


def built_in_models() -> dict[str, str]:
    """Every built-in model name (``--model NAME``) with a one-line description: the tiny model of
    each family (built on first use, offline) and the shipped demo base model. Imports nothing
    heavy, so ``r3v list`` can show it cheaply."""
    return {**{name: spec.description for name, spec in TINY_SPECS.items()}, **SHIPPED_DESCRIPTIONS}


def cache_root() -> Path:
    return Path(os.environ.get("R3V_CACHE", Path.home() / ".cache" / "r3v"))


def tiny_model_path(name: str, seed: int = 0) -> Path:
    """The cached folder of a tiny model, built on first use."""
    if name not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    path = cache_root() / "models" / f"{name}-v{BUILD_VERSION}-seed{seed}"
    if not (path / "r3v_tiny.json").exists():
        build_tiny_model(name, path, seed=seed)
    return path


def build_tiny_model(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny model, its tokenizer and processor, and ``save_pretrained`` them to ``path``.

    The folder is written under a temporary name and renamed, so a killed build leaves no
    half-written model behind.
    """
    import torch

    from r3v.io import atomic_folder

    if name not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    spec = TINY_SPECS[name]
    path = Path(path)
    with atomic_folder(path) as tmp:
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(list(spec.special_tokens), roles=spec.tokenizer_roles)
        model = _build_model(spec, tokenizer)
        processor = _build_processor(spec, tokenizer)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "r3v_tiny.json").write_text(json.dumps({"name": name, "seed": seed, "version": BUILD_VERSION}))
        (tmp / "r3v.json").write_text(json.dumps(BUILT_IN_SETTINGS))
    return path


def _build_model(spec: TinySpec, tokenizer: Any) -> Any:
    import transformers

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in spec.special_tokens}
    values = _resolve(spec.config, ids, len(tokenizer))
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    model = getattr(transformers, spec.model_class)(config)
    stops = [ids[token] for token in spec.stop_tokens]
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = ids[spec.pad_token]
    return model


def _build_processor(spec: TinySpec, tokenizer: Any) -> Any:
    import transformers

    from r3v.models.processors import without_video

    image_class, image_kwargs = spec.image_processor
    image_processor = getattr(transformers, image_class)(**image_kwargs)
    # Without torchvision a video processor cannot be built; the saved folder is the same either way.
    processor_class = without_video(getattr(transformers, spec.processor_class))
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.template,
                           **spec.processor_kwargs)


def _resolve(value: Any, ids: Mapping[str, int], vocab_size: int) -> Any:
    """A spec's config with token names replaced by their ids and ``VOCAB`` by the vocabulary size."""
    if isinstance(value, dict):
        return {key: _resolve(item, ids, vocab_size) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, ids, vocab_size) for item in value]
    if value == VOCAB:
        return vocab_size
    if isinstance(value, str) and value in ids:
        return ids[value]
    return value


def train_tokenizer(special_tokens: list[str], vocab_size: int = 512, roles: Mapping[str, str] | None = None,
                    corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on r3v's own prompt vocabulary, deterministically.

    ``roles`` names the eos / pad / bos tokens (ChatML's by default) and any named token a
    processor reads from its tokenizer (``image_token``, ``boi_token``, ...). ``corpus`` replaces
    the text it is trained on (a demo base model's own task words).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus() if corpus is None else corpus, trainer=trainer)
    roles = dict(roles or {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    basic = {key: roles.pop(key, None) for key in ("eos_token", "pad_token", "bos_token")}
    kwargs: dict[str, Any] = {"unk_token": None, **basic}
    if roles:
        kwargs["extra_special_tokens"] = roles
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)
    fast.padding_side = "left"
    return fast


def _tokenizer_corpus() -> list[str]:
    from r3v.tasks.clevr_synth import corpus_lines

    generic = [
        "Solution: Answer: Options: (A) (B) (C) (D) (E) (F) Model's prediction 1: 2: 3:",
        "Which prediction is correct? Give the final answer. The prediction above may be wrong.",
        "First generate a step-by-step solution, then answer the question using a single numerical value.",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = . , ? ! : ;",
    ]
    return generic * 20 + corpus_lines()


def qwen2_vl_model(
    tokenizer,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 2,
    heads: int = 4,
    vision_hidden: int = 128,
    max_positions: int = 2048,
):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` of another size (benchmarks use it)
    with ``tiny-qwen2-vl``'s layout: heads 32 wide, so M-RoPE's sections sum to 16."""
    spec = TINY_SPECS["tiny-qwen2-vl"]
    text = {**spec.config["text_config"], "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": max_positions}
    vision = {**spec.config["vision_config"], "hidden_size": vision_hidden}
    sized = TinySpec(**{**spec.__dict__, "config": {**spec.config, "text_config": text, "vision_config": vision}})
    return _build_model(sized, tokenizer)


def save_qwen2_vl(path: Path, model, tokenizer, image_processor) -> None:
    """Save model and processor (ChatML template, Qwen's image placeholder) with ``save_pretrained``."""
    from r3v.models.processors import Qwen2VLProcessorNoVideo

    processor = Qwen2VLProcessorNoVideo(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_SPECS["tiny-qwen2-vl"].template
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)

