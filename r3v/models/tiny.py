"""Tiny vision-language models built offline from a config, with the real HF classes.

They exist so that every code path (loading, chat templates, generation, LoRA, training) runs
on a CPU without a hub download. ``tiny-qwen2-vl`` is a ``Qwen2VLForConditionalGeneration`` and
``tiny-llava`` a ``LlavaForConditionalGeneration`` with a CLIP tower and a Qwen2 text model.
Both use a byte-level BPE tokenizer trained here with ``tokenizers``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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

# One template for both tiny models: ChatML turns; images become the model's placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_MODELS = ("tiny-qwen2-vl", "tiny-llava")
#: What the built-in models recommend for an ``r3v train`` run (``r3v.json``, see
#: ``r3v.models.presets``): the tiny trainer preset, and a 64-token limit (clevr-synth rationales
#: are about 30 tokens; a tiny model's longer rambles only cost time).
BUILT_IN_SETTINGS = {"train_preset": "tiny", "sampling": {"max_new_tokens": 64}}
BUILD_VERSION = "2"


def cache_root() -> Path:
    return Path(os.environ.get("R3V_CACHE", Path.home() / ".cache" / "r3v"))


def tiny_model_path(name: str, seed: int = 0) -> Path:
    """The cached folder of a tiny model, built on first use."""
    if name not in TINY_MODELS:
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

    path = Path(path)
    with atomic_folder(path) as tmp:
        torch.manual_seed(seed)
        if name == "tiny-qwen2-vl":
            _build_qwen2_vl(tmp)
        else:
            _build_llava(tmp)
        (tmp / "r3v_tiny.json").write_text(json.dumps({"name": name, "seed": seed, "version": BUILD_VERSION}))
        (tmp / "r3v.json").write_text(json.dumps(BUILT_IN_SETTINGS))
    return path


def train_tokenizer(special_tokens: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on r3v's own prompt vocabulary, deterministically."""
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
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
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


def _image_processor_qwen():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 56x56..112x112 pixels: a 112 px image becomes 4x4 = 16 merged image tokens.
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def qwen2_vl_model(
    tokenizer,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 2,
    heads: int = 4,
    vision_hidden: int = 128,
    max_positions: int = 2048,
):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` sized by the arguments.

    Heads are 32 wide, so M-RoPE's sections must sum to 16 (not the 64 of head_dim 128).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": max_positions,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": vision_hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def save_qwen2_vl(path: Path, model, tokenizer, image_processor) -> None:
    """Save model and processor (ChatML template, Qwen's image placeholder) with ``save_pretrained``."""
    from r3v.models.processors import Qwen2VLProcessorNoVideo

    template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
    processor = Qwen2VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _build_qwen2_vl(path: Path) -> None:
    tokenizer = train_tokenizer(QWEN_SPECIAL_TOKENS)
    save_qwen2_vl(path, qwen2_vl_model(tokenizer), tokenizer, _image_processor_qwen())


def _build_llava(path: Path) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = train_tokenizer(LLAVA_SPECIAL_TOKENS)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in LLAVA_SPECIAL_TOKENS}
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=64,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>"),
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
