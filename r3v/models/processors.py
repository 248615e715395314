"""A model's multimodal processor, and the pixel budget it keeps per image.

``AutoProcessor`` is tried first. Without torchvision, transformers 5.x cannot build the stock
Qwen2-VL / Qwen2.5-VL processors (their video processor needs it), so the loader falls back to
the same processor class with the PIL image processor and no video part.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from transformers import AutoProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """Qwen2-VL's processor without a video processor, for machines without torchvision.

    ProcessorMixin derives a processor's parts from its ``__init__`` signature, so leaving
    ``video_processor`` out of the signature is what removes the video part.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(path: str, trust_remote_code: bool = False):
    """The model's multimodal processor. AutoProcessor can quietly return a bare tokenizer when it
    cannot build the processor class (no torchvision); that is treated as a failure too."""
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
            return processor
        problem: Exception = TypeError(f"AutoProcessor returned {type(processor).__name__}")
    except (ValueError, OSError, AttributeError, ImportError, TypeError) as exc:
        problem = exc
    processor = _load_processor_without_video(path, trust_remote_code)
    if processor is None:
        raise ValueError(f"cannot load a multimodal processor for {path}: {problem}") from problem
    log.info("AutoProcessor failed for %s (%s); using the processor without a video part", path, problem)
    return processor


def _load_processor_without_video(path: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in {"qwen2_vl", "qwen2_5_vl"}:
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError) as exc:
        # transformers 5.17 picks the torchvision image processor even without torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        log.info("AutoImageProcessor failed for %s (%s); using the PIL image processor", path, exc)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None)
    processor = Qwen2VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    if processor.chat_template is None:
        template_file = Path(path) / "chat_template.jinja"
        if template_file.exists():
            processor.chat_template = template_file.read_text()
    return processor


def pixel_cap(processor: Any) -> int | None:
    """The most pixels the processor keeps per image, when its image size is a pixel budget
    (Qwen2-VL family: ``size.longest_edge`` is max_pixels); None for fixed-size processors."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or "Qwen2VL" not in type(image_processor).__name__:
        return None
    size = image_processor.size
    return size["longest_edge"] if isinstance(size, dict) else size.longest_edge


def set_pixel_cap(processor: Any, max_pixels: int) -> bool:
    """Lower the processor's pixel budget per image to ``max_pixels`` (never raise it); False, with
    nothing changed, for a processor that resizes to a fixed size (its image tokens are fixed)."""
    current = pixel_cap(processor)
    if current is None:
        log.info("%s has no pixel budget to cap", type(getattr(processor, "image_processor", processor)).__name__)
        return False
    image_processor = processor.image_processor
    size = image_processor.size
    capped = min(current, max_pixels)
    minimum = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
    if capped < minimum:
        raise ValueError(f"max_pixels={max_pixels} is below the processor's minimum of {minimum} pixels per image")
    if isinstance(size, dict):
        image_processor.size = {**size, "longest_edge": capped}
    else:
        image_processor.size = dataclasses.replace(size, longest_edge=capped)
    return True
