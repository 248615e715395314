"""A model's multimodal processor, and the cap on the visual tokens it makes per image.

``AutoProcessor`` is tried first. Without torchvision, transformers 5.x cannot build a processor
that owns a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision, SmolVLM,
...): the video processors need torchvision. The loader then builds the same processor class
without its video part (``without_video``), with the PIL image processor. Which class, and whether
it has a video part, is read from the processor itself, not from a list of model types.

Each family bounds its visual tokens with its own knob; ``set_pixel_cap`` turns one pixel budget
per image into that knob (see ``cap_kind``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import logging
import math
import types
from pathlib import Path
from typing import Any

from transformers import AutoProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from r3v.errors import DataError

log = logging.getLogger(__name__)


def without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor, for machines without torchvision.

    ProcessorMixin derives a processor's parts from its ``__init__`` signature (``get_attributes``);
    the subclass leaves ``video_processor`` out of them, so loading, saving and construction skip
    it, while the class's own ``__init__`` runs unchanged (with ``video_processor=None``). The
    subclass keeps the original's name, so a folder it saves names the stock class, which
    ``AutoProcessor`` builds where torchvision is installed. A class without a video part is
    returned as it is.
    """
    return _without_video(processor_class)


class _DropVideoArgument(ProcessorMixin):
    """Sits between a processor class and ProcessorMixin in ``without_video``'s subclass: takes the
    (None) video processor out of what the class's ``__init__`` hands ProcessorMixin, wherever the
    class puts it among its parts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        declared = ProcessorMixin.get_attributes.__func__(type(self))  # with video_processor
        if "video_processor" in declared[: len(args)]:
            index = declared.index("video_processor")
            args = args[:index] + args[index + 1 :]
        kwargs.pop("video_processor", None)
        ProcessorMixin.__init__(self, *args, **kwargs)


@functools.cache
def _without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    if "video_processor" not in processor_class.get_attributes():
        return processor_class
    init = processor_class.__init__
    code = init.__code__
    names = code.co_varnames[1 : code.co_argcount]
    defaults = init.__defaults__ or ()
    first_default = len(names) - len(defaults)
    if "video_processor" in names and names.index("video_processor") < first_default:
        # the video processor is a required argument: give it (and what follows it) a default
        defaults = (None,) * (first_default - names.index("video_processor")) + defaults
    # The same function with other defaults: from_args_and_dict reads the accepted settings from
    # the code object's variable names, so a wrapper with another signature would lose them.
    same_init = types.FunctionType(code, init.__globals__, init.__name__, defaults, init.__closure__)
    same_init.__kwdefaults__ = init.__kwdefaults__
    same_init.__qualname__ = init.__qualname__

    def get_attributes(cls: type) -> list[str]:
        return [name for name in ProcessorMixin.get_attributes.__func__(cls) if name != "video_processor"]

    def from_args_and_dict(cls: type, args: list[Any], processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        # by name: the loaded parts come without the video one, which may sit among them positionally
        named = dict(zip(cls.get_attributes(), args, strict=False))
        return super(subclass, cls).from_args_and_dict([], processor_dict, **named, **kwargs)

    subclass = type(processor_class.__name__, (processor_class, _DropVideoArgument), {
        "__init__": same_init, "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict), "__module__": __name__,
        "__qualname__": processor_class.__name__,
        "__doc__": f"{processor_class.__name__} without a video processor (r3v.models.processors.without_video).",
    })
    return subclass


#: Qwen2-VL's processor without a video part (the tiny and real-shape builders save with it).
Qwen2VLProcessorNoVideo = without_video(Qwen2VLProcessor)


def load_processor(path: str, trust_remote_code: bool = False) -> ProcessorMixin:
    """The model's multimodal processor. AutoProcessor can quietly return a bare tokenizer when it
    cannot build the processor class (no torchvision); that is treated as a failure too."""
    check_loadable(path, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
            return processor
        problem: Exception = TypeError(f"AutoProcessor returned {type(processor).__name__}")
    except (ValueError, OSError, AttributeError, ImportError, TypeError, KeyError) as exc:
        problem = exc
    processor_class = processor_class_of(path, trust_remote_code)
    if processor_class is None:
        raise DataError(f"cannot load a multimodal processor for {path}: {problem}") from problem
    try:
        processor = _load_without_video(path, processor_class, trust_remote_code)
    except (ValueError, OSError, AttributeError, ImportError, TypeError, KeyError) as exc:
        raise DataError(f"cannot load a multimodal processor for {path}: {problem}; "
                        f"{processor_class.__name__} without a video part failed too: {exc}") from exc
    log.info("AutoProcessor failed for %s (%s); using %s without a video part", path, problem, processor_class.__name__)
    return processor


#: Auto classes under which a remote-code repository can offer what r3v loads.
_VLM_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")


def check_loadable(path: str, trust_remote_code: bool = False) -> None:
    """Raise a plain ``DataError`` for a model r3v cannot load, before anything heavy runs.

    r3v runs VLMs through transformers' ``AutoModelForImageTextToText`` and a multimodal
    processor. A model whose code lives in its repository (``auto_map`` in its config) loads only
    if that code offers such a class, and only with ``trust_remote_code``. Qwen-VL-Chat (R3V's
    main-table model) offers ``AutoModelForCausalLM`` alone, and its images travel inside the text
    (``<img>path</img>``) through a remote-code tokenizer, with no processor: it cannot run in r3v.
    Folders without a local ``config.json`` (hub ids) are left to transformers.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise DataError(f"{config_file} is not valid JSON: {exc}", path=config_file) from exc
    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    if not auto_map or _transformers_knows(model_type):
        return
    if not any(name in auto_map for name in _VLM_AUTO_CLASSES):
        offered = ", ".join(sorted(auto_map)) or "nothing"
        hint = (" For Qwen-VL-Chat, use a transformers-native Qwen VLM such as Qwen/Qwen2-VL-7B-Instruct "
                "(preset qwen2-vl: R3V's own Qwen2-VL setting) or Qwen/Qwen2.5-VL-7B-Instruct." if model_type == "qwen"
                else "")
        raise DataError(
            f"{path} (model_type {model_type!r}) is a remote-code model whose repository code offers {offered}, "
            "not an image-text-to-text model: r3v loads VLMs with transformers' AutoModelForImageTextToText and a "
            f"multimodal processor, so it cannot run this model, with or without --trust-remote-code.{hint}"
        )
    if not trust_remote_code:
        raise DataError(
            f"{path} (model_type {model_type!r}) runs code from its own repository: pass --trust-remote-code to "
            "allow it (the code runs on this machine with your permissions; read it first)"
        )


def _transformers_knows(model_type: str | None) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return bool(model_type) and model_type in CONFIG_MAPPING_NAMES


def processor_class_of(path: str, trust_remote_code: bool = False) -> type[ProcessorMixin] | None:
    """The transformers processor class a model folder names (``processor_config.json``), else the
    one transformers maps its ``model_type`` to; None when neither names a class transformers has
    (a model whose processor is remote code, or a text-only model)."""
    import transformers

    names = []
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        data = _read_json(path, file)
        if isinstance(data.get("processor_class"), str):
            names.append(data["processor_class"])
    model_type = _read_json(path, "config.json").get("model_type")
    try:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        mapped = PROCESSOR_MAPPING_NAMES.get(model_type) if model_type else None
    except ImportError:  # the mapping moved between releases; the folder's own name still counts
        mapped = None
    if isinstance(mapped, str):
        names.append(mapped)
    for name in names:
        # r3v <= 0.1 saved its own subclass's name, e.g. "Qwen2VLProcessorNoVideo"
        for candidate in (name, name.removesuffix("NoVideo")):
            found = getattr(transformers, candidate, None)
            if isinstance(found, type) and issubclass(found, ProcessorMixin):
                return found
    return None


def _load_without_video(path: str, processor_class: type[ProcessorMixin], trust_remote_code: bool) -> ProcessorMixin:
    no_video = without_video(processor_class)
    try:
        processor = no_video.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError, AttributeError, TypeError) as exc:
        # transformers 5.17's AutoImageProcessor picks the torchvision image processor even without
        # torchvision: build the parts by hand, with the PIL image processor the folder's one names.
        from transformers import AutoTokenizer

        log.info("loading %s's parts failed for %s (%s); using the PIL image processor", no_video.__name__, path, exc)
        image_processor = _pil_image_processor(path, exc)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        accepted = set(inspect.signature(no_video.__init__).parameters) - {"image_processor", "tokenizer"}
        settings = {k: v for k, v in _read_json(path, "processor_config.json").items() if k in accepted}
        processor = no_video(image_processor=image_processor, tokenizer=tokenizer, **settings)
    if getattr(processor, "chat_template", None) is None:
        tokenizer_template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
        template_file = Path(path) / "chat_template.jinja"
        if tokenizer_template:
            processor.chat_template = tokenizer_template
        elif template_file.exists():
            processor.chat_template = template_file.read_text()
    return processor


def _pil_image_processor(path: str, cause: Exception) -> Any:
    import transformers

    data = _read_json(path, "preprocessor_config.json") or _read_json(path, "processor_config.json").get(
        "image_processor", {})
    name = str(data.get("image_processor_type", ""))
    for candidate in (name, f"{name}Pil", name.removesuffix("Fast") + "Pil"):
        found = getattr(transformers, candidate, None)
        if candidate.endswith("Pil") and isinstance(found, type):
            return found.from_pretrained(path)
    raise ValueError(f"cannot load the image processor of {path} ({name or 'unnamed'}): {cause}") from cause


def _read_json(path: str, name: str) -> dict[str, Any]:
    """A JSON file of a local model folder; empty when the folder or file is absent (hub ids)."""
    file = Path(path) / name
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------
# Visual-token caps
# ---------------------------------------------------------------------------------------------

#: How each kind of image processor bounds its visual tokens (what ``cap_kind`` returns):
#: ``pixel_budget``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL resize into a pixel budget (``size.longest_edge``
#: is max_pixels; one token per (patch x merge)^2 pixels). ``longest_edge``: Idefics3 / SmolVLM
#: resize the longest edge to ``size.longest_edge``, then split into crops of ``max_image_size``.
#: The cap rounds down to whole crops, as the processor rounds the resized image up to them.
#: ``tiles``: InternVL cuts an image into at most ``max_patches`` tiles (plus a thumbnail).
#: ``anyres``: LLaVA-OneVision picks a crop grid for the image's size among ``image_grid_pinpoints``;
#: the model derives the same grid from its config and the image's size, so r3v keeps the grids but
#: downscales an image to fit one of at most the capped area before the processor (``fit_image``).
#: ``fixed``: LLaVA-1.5, Gemma 3 and other processors that resize every image to one size: a
#: constant token count, no cap needed.
CAP_KINDS = ("pixel_budget", "longest_edge", "tiles", "anyres", "fixed")
#: Set on a processor by ``set_pixel_cap`` for the ``anyres`` kind: the most pixels an image may
#: have when it reaches the processor (``fit_image``).
DOWNSCALE_ATTRIBUTE = "r3v_max_pixels"


def cap_kind(processor: Any) -> str:
    """Which of ``CAP_KINDS`` the processor's image processor is, read from its settings."""
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None)
    if any(cls.__name__.startswith("Qwen2VLImageProcessor") for cls in type(image_processor).__mro__):
        return "pixel_budget"
    if getattr(image_processor, "image_grid_pinpoints", None):
        return "anyres"
    if getattr(image_processor, "max_image_size", None) is not None and _size(size, "longest_edge"):
        return "longest_edge"
    if hasattr(image_processor, "max_patches") and getattr(image_processor, "crop_to_patches", None) is not None:
        return "tiles"
    return "fixed"


def pixel_cap(processor: Any) -> int | None:
    """The most pixels per image the processor turns into visual tokens: its pixel budget, the square
    of its longest edge, its tiles' area, its largest anyres grid (or r3v's cap on it); None for
    fixed-size processors."""
    kind = cap_kind(processor)
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None)
    if kind == "pixel_budget":
        return _size(size, "longest_edge")
    if kind == "longest_edge":
        return _size(size, "longest_edge") ** 2
    if kind == "tiles":
        return int(image_processor.max_patches) * _size(size, "height") * _size(size, "width")
    if kind == "anyres":
        return max(h * w for h, w in _allowed_grids(processor))
    return None


def set_pixel_cap(processor: Any, max_pixels: int) -> bool:
    """Lower the processor's visual tokens per image to what ``max_pixels`` pixels give, through the
    family's own knob (see ``CAP_KINDS``); never raise them. False, with nothing changed, for a
    processor that resizes to a fixed size (its image tokens are fixed: it needs no cap)."""
    kind = cap_kind(processor)
    image_processor = getattr(processor, "image_processor", processor)
    if kind == "fixed":
        log.info("%s resizes every image to one size: no pixel cap needed", type(image_processor).__name__)
        return False
    current = pixel_cap(processor)
    assert current is not None
    capped = min(current, max_pixels)
    size = image_processor.size
    if kind == "pixel_budget":
        minimum = _size(size, "shortest_edge")
        if capped < minimum:
            raise ValueError(f"max_pixels={max_pixels} is below the processor's minimum of {minimum} pixels per image")
        image_processor.size = _with_size(size, longest_edge=capped)
    elif kind == "longest_edge":
        crop = _size(image_processor.max_image_size, "longest_edge")
        edge = math.isqrt(capped) // crop * crop
        if edge < crop:
            raise ValueError(f"max_pixels={max_pixels} is below one {crop}x{crop} crop of this processor")
        image_processor.size = _with_size(size, longest_edge=edge)
    elif kind == "tiles":
        tile = _size(size, "height") * _size(size, "width")
        tiles = capped // tile
        if tiles < max(1, int(getattr(image_processor, "min_patches", 1))):
            raise ValueError(f"max_pixels={max_pixels} is below one {_size(size, 'height')}x{_size(size, 'width')} tile")
        image_processor.max_patches = tiles
    else:  # anyres
        smallest = min(h * w for h, w in image_processor.image_grid_pinpoints)
        if capped < smallest:
            raise ValueError(f"max_pixels={max_pixels} is below the smallest crop grid ({smallest} pixels)")
        setattr(processor, DOWNSCALE_ATTRIBUTE, capped)
    return True


def fit_image(processor: Any, image: Any) -> Any:
    """``image`` downscaled (aspect kept) to fit the largest anyres grid within the processor's r3v
    pixel cap, when it has one (the ``anyres`` kind) and the image does not fit already; otherwise
    the image as it is. The processor then picks a grid of at most the capped area: the smallest
    grid that holds the whole image."""
    if getattr(processor, DOWNSCALE_ATTRIBUTE, None) is None or not hasattr(image, "size"):
        return image
    width, height = image.size
    scale = max(min(1.0, grid_w / width, grid_h / height) for grid_h, grid_w in _allowed_grids(processor))
    if scale >= 1.0:
        return image
    from PIL import Image

    return image.resize((max(1, math.floor(width * scale)), max(1, math.floor(height * scale))), Image.BICUBIC)


def _allowed_grids(processor: Any) -> list[tuple[int, int]]:
    """The anyres grids, (height, width), of at most the r3v pixel cap (all when there is none)."""
    grids = [(int(h), int(w)) for h, w in processor.image_processor.image_grid_pinpoints]
    cap = getattr(processor, DOWNSCALE_ATTRIBUTE, None)
    return [g for g in grids if cap is None or g[0] * g[1] <= cap] or [min(grids, key=lambda g: g[0] * g[1])]


def processor_call_kwargs(processor: Any, max_pixels: int) -> dict[str, Any]:
    """What a processor call takes to apply ``max_pixels`` (for engines that run the processor
    themselves, e.g. vLLM's ``mm_processor_kwargs``); empty for the ``anyres`` kind, whose images
    are downscaled by ``fit_image`` first. Raises for fixed-size processors."""
    kind = cap_kind(processor)
    image_processor = getattr(processor, "image_processor", processor)
    if kind == "fixed":
        raise ValueError(
            f"max_pixels applies to processors with a pixel budget (Qwen2-VL-family), a longest edge (Idefics3, "
            f"SmolVLM), tiles (InternVL) or an anyres grid (LLaVA-OneVision); {type(image_processor).__name__} "
            "resizes every image to one size, so its image tokens are fixed")
    capped = copy.copy(processor)
    capped.image_processor = copy.deepcopy(image_processor)
    set_pixel_cap(capped, max_pixels)
    if kind == "pixel_budget":
        return {"max_pixels": pixel_cap(capped)}
    if kind == "longest_edge":
        return {"size": {"longest_edge": _size(capped.image_processor.size, "longest_edge")}}
    if kind == "tiles":
        return {"max_patches": int(capped.image_processor.max_patches)}
    return {}


def _size(size: Any, key: str) -> Any:
    """One entry of an image processor's ``size`` (a dict, or a SizeDict in newer releases)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _with_size(size: Any, **changes: Any) -> Any:
    return {**size, **changes} if isinstance(size, dict) else dataclasses.replace(size, **changes)
