"""Real-shape models: the public architecture of Qwen2-VL / Qwen2.5-VL with random weights, built offline.

They exist to check r3v at the sizes users run (2B, 7B) without downloading anything: the model
is the real HF class built from the public ``config.json`` values shipped in
``r3v/models/configs/``, so every tensor has its real shape; the weights are random, so accuracy
means nothing, but time, memory, token counts and every code path do.

The tokenizer is a small byte-level BPE trained here on r3v's own prompt words, padded with filler
tokens to the model's vocabulary size, so that ``len(tokenizer) == vocab_size`` and every special
token (``<|im_start|>``, ``<|image_pad|>``, ...) has exactly its public id. Text tokenises into
more pieces than with Qwen's real 151k-token BPE (a short vocabulary splits words more), so text
token counts are an upper bound of the real ones; image token counts are exact, as the image
processor is Qwen's with its public defaults.

    python -m r3v.models.real_shape --config qwen2-vl-2b --out /tmp/qwen2-vl-2b-rs --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3v.io import atomic_folder

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Short names accepted everywhere a config name is; the file stems are accepted too.
ALIASES = {
    "qwen2-vl-2b": "qwen2-vl-2b-instruct",
    "qwen2-vl-7b": "qwen2-vl-7b-instruct",
    "qwen2.5-vl-7b": "qwen2.5-vl-7b-instruct",
}
#: Keys of a shipped config file that are r3v's notes, not config values; removed before building.
META_KEYS = ("_source", "_preprocessor", "_special_tokens")
MARKER = "r3v_real_shape.json"
BUILD_VERSION = 1
DTYPES = ("bfloat16", "float32", "float16")
#: Safetensors shard size: saving copies one shard at a time into memory, so small shards keep
#: the peak near one copy of the weights.
SHARD_SIZE = "1GB"
FILLER = "<|r3v_filler_{}|>"
#: Tokens the chat template and the loader need, whatever else a config lists.
REQUIRED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")


class RealShapeError(ValueError):
    """A config that cannot be built: unknown name, malformed file, or inconsistent ids."""


@dataclass(frozen=True)
class RealShapeSpec:
    """One config file, split into its parts."""

    name: str
    """The file stem, e.g. ``qwen2-vl-2b-instruct``."""
    path: Path
    values: dict[str, Any]
    """The public ``config.json`` values (r3v's note keys removed)."""
    preprocessor: dict[str, Any]
    special_tokens: dict[str, int]
    source: Any
    sha256: str
    """Of the file's bytes: says which config a built folder came from."""

    @property
    def model_type(self) -> str:
        return self.values["model_type"]

    @property
    def vocab_size(self) -> int:
        text = self.values.get("text_config") or {}
        return int(text.get("vocab_size", self.values.get("vocab_size")))


def config_path(name_or_config: str | Path) -> Path:
    """The JSON file for a shipped name (short or full) or a path to a config file of the same format."""
    text = str(name_or_config)
    stem = ALIASES.get(text, text)
    shipped = CONFIG_DIR / f"{stem}.json"
    if shipped.exists():
        return shipped
    path = Path(text)
    if path.suffix == ".json" and path.exists():
        return path
    known = ", ".join(sorted({*ALIASES, *ALIASES.values()}))
    raise RealShapeError(f"unknown real-shape config {text!r}: give one of {known}, or a path to a .json config")


def load_spec(name_or_config: str | Path) -> RealShapeSpec:
    """Read and check a config file: model type, special-token ids and the config's own token ids agree."""
    path = config_path(name_or_config)
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RealShapeError(f"{path}: not valid JSON ({exc})") from exc
    values = {k: v for k, v in data.items() if k not in META_KEYS}
    if values.get("model_type") not in _MODEL_CLASSES:
        raise RealShapeError(f"{path}: model_type must be one of {sorted(_MODEL_CLASSES)}, got {values.get('model_type')!r}")
    specials = data.get("_special_tokens") or {}
    missing = [t for t in REQUIRED_TOKENS if t not in specials]
    if missing:
        raise RealShapeError(f"{path}: _special_tokens lacks {', '.join(missing)}")
    spec = RealShapeSpec(
        name=path.stem, path=path, values=values, preprocessor=dict(data.get("_preprocessor") or {}),
        special_tokens={str(k): int(v) for k, v in specials.items()}, source=data.get("_source"),
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    _check_ids(spec)
    return spec


def _check_ids(spec: RealShapeSpec) -> None:
    ids = spec.special_tokens
    if len(set(ids.values())) != len(ids):
        raise RealShapeError(f"{spec.path}: two special tokens share an id")
    if max(ids.values()) >= spec.vocab_size or min(ids.values()) < 0:
        raise RealShapeError(f"{spec.path}: special-token ids must lie in [0, vocab_size={spec.vocab_size})")
    # the model finds images by these ids, so they must name the tokens the template writes
    expected = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for key, token in expected.items():
        if key in spec.values and spec.values[key] != ids[token]:
            raise RealShapeError(f"{spec.path}: {key} is {spec.values[key]} but {token} has id {ids[token]}")


_MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def model_class(spec: RealShapeSpec):
    import transformers

    return getattr(transformers, _MODEL_CLASSES[spec.model_type])


def hf_config(spec: RealShapeSpec, dtype: str | None = None):
    """The transformers config object; the legacy flat hub layout is converted by transformers itself."""
    config = model_class(spec).config_class.from_dict(dict(spec.values))
    if dtype is not None:
        # the hub's torch_dtype is copied into text_config, and transformers 5 builds each sub-model
        # in its sub-config's dtype: all of them must say the build dtype
        for part in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
            if part is not None:
                part.dtype = dtype
    return config


def parameter_counts(name_or_config: str | Path | RealShapeSpec) -> dict[str, int]:
    """Parameters of the model a config builds, counted on the ``meta`` device (no memory, about a second).

    ``vision`` is the vision tower with its merger (``model.visual``); ``language_model`` is all the
    rest: embeddings, decoder layers, final norm and an untied ``lm_head`` (also given alone).
    A tied ``lm_head`` shares the embedding matrix and is counted once.
    """
    import torch

    spec = name_or_config if isinstance(name_or_config, RealShapeSpec) else load_spec(name_or_config)
    with torch.device("meta"):
        model = model_class(spec)(hf_config(spec))
    return count_parameters(model)


def count_parameters(model) -> dict[str, int]:
    """Unique parameters by part (``named_parameters`` yields a tied weight once)."""
    counts = {"total": 0, "language_model": 0, "vision": 0, "lm_head": 0}
    for name, parameter in model.named_parameters():
        n = parameter.numel()
        counts["total"] += n
        if ".visual." in f".{name}":
            counts["vision"] += n
        else:
            counts["language_model"] += n
            if name.startswith("lm_head."):
                counts["lm_head"] += n
    return counts


# ---------------------------------------------------------------- tokenizer
def _corpus() -> list[str]:
    """r3v's own prompt words: the clevr-synth corpus, ChartQA's instructions and chart words."""
    from r3v.tasks import chartqa
    from r3v.tasks.clevr_synth import corpus_lines

    charts = [
        "What is the value of the bar? Which category has the highest value? the lowest value?",
        "What is the difference between the two values? What is the sum? In which year was it highest?",
        "Sales Revenue Units sold Year Month Country City Product Category Value Share Percent Total",
        "Solution: Answer: The chart shows that the value is. So the difference is. Model's prediction",
    ]
    prompts = [chartqa.COT, chartqa.QA, chartqa.SELECT]
    return (charts + prompts) * 20 + corpus_lines()


def build_tokenizer(spec: RealShapeSpec, trained_size: int = 4096):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens and the public special-token ids.

    A BPE is trained on r3v's prompt words (up to ``trained_size`` tokens); its tokens take the low
    ids, the special tokens their public ids, and filler tokens (``<|r3v_filler_N|>``, never produced
    by encoding) every id left, so that any id a random model samples decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = spec.special_tokens
    trainer = trainers.BpeTrainer(
        vocab_size=trained_size, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(small.to_str())["model"]
    regular = [token for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1])]
    lowest_special = min(specials.values())
    if len(regular) > lowest_special:
        raise RealShapeError(f"{len(regular)} trained tokens do not fit below the first special id {lowest_special}")
    vocab = {token: index for index, token in enumerate(regular)}
    taken = set(specials.values())
    vocab.update({FILLER.format(i): i for i in range(len(regular), spec.vocab_size) if i not in taken})
    # special tokens sit in the model vocabulary at their ids; add_special_tokens then reuses those ids
    vocab.update(specials)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
    )
    fast.padding_side = "left"
    _check_tokenizer(fast, spec)
    return fast


def _check_tokenizer(tokenizer, spec: RealShapeSpec) -> None:
    if len(tokenizer) != spec.vocab_size:
        raise RealShapeError(f"tokenizer has {len(tokenizer)} tokens, the model {spec.vocab_size}")
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in spec.special_tokens.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        raise RealShapeError(f"special tokens at the wrong ids: {wrong}")


def build_image_processor(spec: RealShapeSpec):
    """Qwen's PIL image processor with the config's public preprocessor values (not transformers' defaults,
    which in 5.x cap images at about 1M pixels instead of the public 12.8M)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = spec.preprocessor
    needed = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
    missing = [k for k in needed if k not in pre]
    if missing:
        raise RealShapeError(f"{spec.path}: _preprocessor lacks {', '.join(missing)}")
    kwargs = {k: pre[k] for k in needed}
    for key in ("image_mean", "image_std"):
        if key in pre:
            kwargs[key] = list(pre[key])
    return Qwen2VLImageProcessorPil(**kwargs)


# ---------------------------------------------------------------- build
def build_real_shape_model(name_or_config: str | Path, out: str | Path, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Build a real-shape model with random weights into ``out`` and return it.

    The weights are created directly in ``dtype`` (the default dtype is switched while the model is
    constructed), so the peak memory is about one copy of the weights plus one safetensors shard.
    The folder is written under a temporary name beside ``out`` and renamed when complete, so an
    interrupted build leaves nothing at ``out``; an existing ``out`` is replaced.
    """
    import torch

    if dtype not in DTYPES:
        raise RealShapeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    spec = load_spec(name_or_config)
    out = Path(out)
    started = time.perf_counter()
    tokenizer = build_tokenizer(spec)
    image_processor = build_image_processor(spec)
    with atomic_folder(out) as tmp:
        torch.manual_seed(seed)
        config = hf_config(spec, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = model_class(spec)(config)
        finally:
            torch.set_default_dtype(previous)
        ids = spec.special_tokens
        # Qwen's generation_config: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        model.generation_config.bos_token_id = ids["<|endoftext|>"]
        counts = count_parameters(model)
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        del model
        _save_processor(tmp, tokenizer, image_processor)
        marker = {
            "config": spec.name, "config_file": str(spec.path), "config_sha256": spec.sha256, "seed": seed,
            "dtype": dtype, "parameters": counts, "vocab_size": spec.vocab_size,
            "build_seconds": round(time.perf_counter() - started, 2), "version": BUILD_VERSION,
            "torch": torch.__version__, "transformers": _transformers_version(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def _save_processor(path: Path, tokenizer, image_processor) -> None:
    from r3v.models.processors import Qwen2VLProcessorNoVideo
    from r3v.models.tiny import CHAT_TEMPLATE

    # ChatML turns with Qwen's image placeholder, as the tiny models write (no default system turn)
    template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
    processor = Qwen2VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    processor.save_pretrained(path)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The build record of a real-shape folder, or None when the folder is not a finished build."""
    marker = Path(path) / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def is_current_build(path: str | Path, name_or_config: str | Path, seed: int, dtype: str) -> bool:
    """Whether ``path`` holds a finished build of this config file (same bytes), seed and dtype."""
    marker = read_marker(path)
    if marker is None:
        return False
    spec = load_spec(name_or_config)
    return (marker.get("config_sha256") == spec.sha256 and marker.get("seed") == seed and marker.get("dtype") == dtype
            and marker.get("version") == BUILD_VERSION)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def main(argv: list[str] | None = None) -> None:
    """Build one model and print what the build measured, as JSON."""
    parser = argparse.ArgumentParser(description="Build a real-shape Qwen2-VL / Qwen2.5-VL with random weights.")
    parser.add_argument("--config", required=True, help=f"{', '.join(ALIASES)}, a full name, or a .json path")
    parser.add_argument("--out", required=True, help="Folder to write (replaced if it exists).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = build_real_shape_model(args.config, args.out, seed=args.seed, dtype=args.dtype)
    record = read_marker(path) or {}
    print(json.dumps({
        "path": str(path), "config": record.get("config"), "dtype": args.dtype, "seed": args.seed,
        "parameters": record.get("parameters"), "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": peak_rss_mib(),
        "disk_mib": round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
