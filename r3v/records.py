"""The records r3v passes around, and their JSON-lines form: its vocabulary, with no torch.

- ``Example``: one benchmark question. ``Sample``: one generated completion for it, already scored.
  ``TrainItem``: one supervised item (prompt in, target out) of a kind, training an objective.
- ``Request``, ``Sampling``, ``Completion``: what a generation backend takes and gives back.
- ``Choice``: the answer a test-time selector picked.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from r3v.errors import DataError


@dataclass
class Example:
    """One question of a task. ``images`` holds file paths or PIL images; paths load lazily."""

    id: str
    task: str
    question: str
    answer: Any
    images: list[str | Image.Image] = field(default_factory=list)
    choices: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        return [load_image(img, record=self.id) for img in self.images]

    def to_dict(self) -> dict[str, Any]:
        images = [img if isinstance(img, str) else None for img in self.images]
        if any(img is None for img in images):
            raise ValueError(f"example {self.id!r} holds in-memory images, which JSON cannot carry")
        return {
            "id": self.id,
            "task": self.task,
            "question": self.question,
            "answer": self.answer,
            "images": images,
            "choices": self.choices,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        return cls(**_known_fields(cls, data))


@dataclass
class Sample:
    """One completion for one example, with its extracted answer and verdict."""

    example_id: str
    sample_index: int
    text: str
    answer: str | None
    correct: bool
    model: str
    sampling: dict[str, Any]
    seed: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    iteration: int | None = None
    #: Wall seconds of the generate call that made it, shared evenly by the call's completions
    #: (0: not measured, e.g. a store written by an older r3v). Timing, not identity: equality ignores it.
    seconds: float = field(default=0.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(**_known_fields(cls, data))


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = required - data.keys()
    if missing:
        raise DataError(f"missing field(s) {', '.join(sorted(missing))}")
    return {k: v for k, v in data.items() if k in names}


#: Qwen2-VL's image processor refuses images more elongated than 200:1.
MAX_ASPECT_RATIO = 200


def load_image(image: str | Path | Image.Image, record: str = "?") -> Image.Image:
    """Open an image fully and convert it to RGB, or raise a DataError that names it."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image)
    if not path.exists():
        raise DataError(f"image file not found: {path}", path=path, record=record)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}", path=path, record=record) from exc
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Qwen2-VL's processor raises deep inside a batch on such images; fail here, by name.
        raise DataError(
            f"image {path} is {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}:1, which VLM processors reject",
            path=path,
            record=record,
        )
    return image


def write_jsonl(path: str | Path, records: list[Any]) -> None:
    """Write records (dataclasses or dicts) atomically: a temp file, then a rename."""
    from r3v.io import atomic_write_text

    lines = [json.dumps(_as_dict(r), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line raises a DataError naming the file and line."""
    from r3v.io import iter_jsonl

    return [record for _, record in iter_jsonl(path)]


def _as_dict(record: Any) -> dict[str, Any]:
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


#: Item kinds, in the order counts are reported: direct-answer QA and distilled CoT (the warm-up),
#: then the self-generated self-CoT, self-refine and self-select items.
KINDS = ("qa", "distill", "cot", "refine", "select")
#: The three R3V objectives, in the order their losses are indexed.
OBJECTIVES = ("sft", "refine", "select")
#: Which loss each item kind trains: R3V logs and weights these three objectives separately.
OBJECTIVE_OF_KIND = {"qa": "sft", "distill": "sft", "cot": "sft", "refine": "refine", "select": "select"}


@dataclass
class TrainItem:
    """One supervised item: a user prompt (with the example's images) and the assistant target.

    ``kind`` is qa | distill | cot | refine | select. ``images`` overrides the example's images
    (e.g. for warm-up files that name their own image files).
    """

    kind: str
    example_id: str
    prompt: str
    target: str
    images: list[str] | None = None

    @property
    def objective(self) -> str:
        return OBJECTIVE_OF_KIND[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainItem:
        return cls(**_known_fields(cls, data))


@dataclass
class Request:
    """One chat turn for the model: a user message of images then text.

    ``messages`` is the HF chat format; ``images`` are the PIL images its ``{"type": "image"}``
    parts refer to, in order.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)

    @classmethod
    def user(cls, text: str, images: list[Image.Image] | None = None) -> Request:
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return cls(messages=[{"role": "user", "content": content}], images=images)

    @property
    def text(self) -> str:
        """All text parts, joined: what a backend without images would see."""
        parts = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [p["text"] for p in content if p.get("type") == "text"]
        return "\n".join(parts)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``greedy`` ignores temperature, top_p and top_k."""

    n: int = 1
    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 384
    seed: int = 0
    greedy: bool = False
    #: Penalty on the logits of tokens already in the prompt or the output (as transformers'
    #: ``repetition_penalty``); None: the model's generation config's (1.05 for Qwen2-VL-Instruct),
    #: else 1 (none). Both backends apply it, greedy decoding included.
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.repetition_penalty is None:  # unset: records written before the field keep their shape
            del data["repetition_penalty"]
        return data

    @classmethod
    def greedy_decoding(cls, max_new_tokens: int = 512, seed: int = 0, repetition_penalty: float | None = None) -> Sampling:
        return cls(n=1, greedy=True, max_new_tokens=max_new_tokens, seed=seed, repetition_penalty=repetition_penalty)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)


@dataclass
class Choice:
    """The answer a selector picked (None when no candidate has one), and how it got there."""

    answer: str | None
    correct: bool
    #: "model" (the model chose), "skipped" (all candidates agreed, no model call),
    #: "fallback" (model output unparseable, majority vote used), "unparseable" (model output
    #: unparseable, scored wrong), or "rule" (no model involved).
    how: str = "rule"
    raw_output: str | None = None
    #: The selector's own model call for this choice (self-select's), when it made one.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = field(default=0.0, compare=False)
