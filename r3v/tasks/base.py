"""What a task (benchmark adapter) provides, and small helpers that tasks share.

A task is a plain class registered with ``@tasks.register("name")``. It loads examples, writes
the prompts, and extracts and scores answers the way the benchmark's official evaluation does.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from r3v.errors import DataError
from r3v.records import Example

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@runtime_checkable
class Task(Protocol):
    name: str
    splits: tuple[str, ...]
    #: Where the data can come from, for ``r3v list`` (e.g. "local dir; hub: LightChen2333/M3CoT").
    sources: str
    #: Example.metadata keys that the official evaluation breaks accuracy down by.
    breakdown_keys: tuple[str, ...]

    def load(
        self, split: str, data_dir: str | Path | None = None, limit: int | None = None
    ) -> list[Example]: ...

    def cot_prompt(self, example: Example) -> str:
        """The question with the chain-of-thought instruction; the answer ends in ``answer_line``."""

    def qa_prompt(self, example: Example) -> str:
        """The question with the direct-answer instruction."""

    def answer_line(self, answer: Any, example: Example) -> str:
        """The final line a rationale ends with, e.g. ``Answer: 3``."""

    def select_instruction(self, example: Example) -> str:
        """The instruction after the numbered candidates in a self-select prompt."""

    def extract(self, text: str, example: Example) -> str | None:
        """The answer in a model output, or None when it cannot be parsed. Never raises."""

    def normalize(self, answer: str, example: Example) -> str:
        """Canonical form of an extracted answer: equal strings mean equal answers (majority vote)."""

    def is_correct(self, answer: str | None, example: Example) -> bool: ...


@dataclass(frozen=True)
class InstructionPrompts:
    """The prompt methods of a free-answer task (ChartQA, CLEVR-Math): the question, a newline, then
    R3V's instruction; rationales end in ``Answer: x``. Those tasks differ only in the instruction
    texts, so they share these methods instead of each writing the same four.
    """

    cot: str
    qa: str
    select: str

    def cot_prompt(self, example: Example) -> str:
        return f"{example.question}\n{self.cot}"

    def qa_prompt(self, example: Example) -> str:
        return f"{example.question}\n{self.qa}"

    def answer_line(self, answer: Any, example: Example) -> str:
        return f"Answer: {answer}"

    def select_instruction(self, example: Example) -> str:
        return self.select


def format_options(choices: Sequence[str]) -> str:
    """``(A) x\\n(B) y`` as R3V and M3CoT print choices."""
    return "\n".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def letter_index(letter: str) -> int:
    return OPTION_LETTERS.index(letter.upper())


def option_letter(answer: Any) -> str:
    """The option letter of a gold answer given as a 0-based index or as a letter.

    The multiple-choice tasks write it in their answer lines; one rule keeps them in step.
    """
    return OPTION_LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()


def check_split(task: str, splits: Sequence[str], split: str) -> None:
    """Refuse a split the task does not have, with the one message every task gives."""
    if split not in splits:
        raise ValueError(f"{task} has splits {', '.join(splits)}, not {split!r}")


def flag(name: str, value: bool | str) -> bool:
    """A boolean option, also given as text ("true"/"false", "1"/"0", "yes"/"no") as ``--task-arg`` passes it.

    Shared so that every task reads ``--task-arg skip_bad=yes`` the same way.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def raise_or_record(
    error: DataError, skip_bad: bool, bad_records: list[str], cause: BaseException | None = None
) -> None:
    """Raise a malformed record's error, or, under ``skip_bad``, note it in ``bad_records`` and go on.

    Every loader makes this choice per record; one function keeps the rule (and what is noted) alike.
    ``cause``, when given, is chained as the error's ``__cause__``.
    """
    if not skip_bad:
        if cause is not None:
            raise error from cause
        raise error
    bad_records.append(str(error))


def read_json(path: Path) -> Any:
    """A whole JSON file, with every way it can fail turned into a DataError naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}", path=path) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", path=path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON: {exc}", path=path) from exc


def present_key(record: dict, keys: tuple[str, ...], where: dict) -> str:
    """The first of ``keys`` (a field and its aliases in other schemas) that ``record`` has."""
    for key in keys:
        if key in record:
            return key
    raise DataError(f"missing field {' or '.join(repr(k) for k in keys)}", **where)


def text_field(record: dict, keys: tuple[str, ...], where: dict) -> str:
    """The first of ``keys`` present in ``record``, which must be a string; ``where`` names the record."""
    key = present_key(record, keys, where)
    if not isinstance(record[key], str):
        raise DataError(f"field {key!r} should be str, got {type(record[key]).__name__}", **where)
    return record[key]


def local_image(
    root: Path, relative: str, allow_outside: bool, check: bool, record: str | None, kind: str = "image file"
) -> Path:
    """The image a record names under ``root``: kept inside it (see ``safe_path``) and, with ``check``,
    present on disk, so a missing file is reported at load time rather than mid-generation."""
    image = safe_path(root, relative, allow_outside, record=record)
    if check and not image.is_file():
        raise DataError(f"{kind} not found: {image}", path=image, record=record)
    return image


def hub_image(value: Any, where: dict) -> str | Image.Image:
    """An image cell of a Hugging Face dataset read with ``decode=False``.

    Embedded bytes become a PIL image opened lazily (only the header is read now, so a whole
    split does not sit decoded in memory); a bare path is kept as a path when the file exists.
    """
    if isinstance(value, Image.Image):
        return value
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if isinstance(data, (bytes, bytearray)) and data:
        try:
            return Image.open(io.BytesIO(data))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read the image bytes: {exc}", **where) from exc
    if isinstance(path, str) and Path(path).is_file():
        return path
    raise DataError("the image has neither bytes nor a readable file path", **where)


def resolve_data_file(data_dir: str | Path | None, *names: str, task: str) -> Path:
    """The first of ``names`` that exists under ``data_dir``; a clear error when none does."""
    if data_dir is None:
        raise DataError(f"task {task!r} needs --data-dir pointing at its official files")
    root = Path(data_dir)
    for name in names:
        if (root / name).exists():
            return root / name
    raise DataError(f"task {task!r}: none of {', '.join(names)} found under {root}", path=root)


def safe_path(root: str | Path, relative: str, allow_outside: bool = False, record: str | None = None) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (``../``, absolute) unless allowed."""
    root = Path(root)
    candidate = (root / relative.replace("\\", "/")).resolve()
    if not allow_outside and not candidate.is_relative_to(root.resolve()):
        raise DataError(
            f"image path {relative!r} escapes the data root {root}; pass --allow-outside-paths to permit it",
            path=root,
            record=record,
        )
    return candidate


def load_hub_split(dataset: str, split: str, **kwargs: Any):
    """``datasets.load_dataset`` for one split. ``dataset`` is a hub id or a local folder/file path."""
    import datasets

    local = Path(dataset)
    if local.is_file():
        builder = {"parquet": "parquet", "json": "json", "jsonl": "json"}[local.suffix.lstrip(".")]
        return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, **kwargs)
    return datasets.load_dataset(dataset, split=split, **kwargs)


def load_hub_undecoded(dataset: str, split: str, **kwargs: Any):
    """``load_hub_split`` with a load failure as one DataError and the ``image`` column left undecoded.

    Undecoded, each image is opened only when its row is read (see ``hub_image``).
    """
    import datasets

    try:
        data = load_hub_split(dataset, split, **kwargs)
    except Exception as exc:  # offline, unknown id, missing split: one clear input error
        raise DataError(f"cannot load {dataset!r} split {split!r}: {exc}", path=dataset) from exc
    if "image" in data.column_names and isinstance(data.features["image"], datasets.Image):
        data = data.cast_column("image", datasets.Image(decode=False))
    return data


def build_task(name: str, task_args: dict[str, Any] | None = None, **options: Any) -> Any:
    """A registered task, built with its options.

    ``task_args`` (``--task-arg KEY=VALUE``) must all be accepted by the task's constructor;
    ``options`` (skip_bad, allow_outside_paths) go only to tasks whose constructor takes them.
    """
    import inspect

    from r3v.registry import tasks

    factory = tasks.get(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(task_args or {}) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p not in ("self", "args", "kwargs")) or "none"
        raise ValueError(f"task {name!r} takes no option {', '.join(unknown)}; it takes: {known}")
    kwargs = {key: value for key, value in options.items() if key in accepted}
    return factory(**{**kwargs, **(task_args or {})})
