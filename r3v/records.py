"""The two records r3v passes around, and their JSON-lines form.

``Example`` is one benchmark question. ``Sample`` is one generated completion for it, already
scored. Both serialise to one JSON object per line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
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
