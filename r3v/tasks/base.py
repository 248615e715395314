"""What a task (benchmark adapter) provides, and small helpers that tasks share.

A task is a plain class registered with ``@tasks.register("name")``. It loads examples, writes
the prompts, and extracts and scores answers the way the benchmark's official evaluation does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


def format_options(choices: Sequence[str]) -> str:
    """``(A) x\\n(B) y`` as R3V and M3CoT print choices."""
    return "\n".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def letter_index(letter: str) -> int:
    return OPTION_LETTERS.index(letter.upper())


def resolve_data_file(data_dir: str | Path | None, *names: str, task: str) -> Path:
    """The first of ``names`` that exists under ``data_dir``; a clear error when none does."""
    from r3v.errors import DataError

    if data_dir is None:
        raise DataError(f"task {task!r} needs --data-dir pointing at its official files")
    root = Path(data_dir)
    for name in names:
        if (root / name).exists():
            return root / name
    raise DataError(f"task {task!r}: none of {', '.join(names)} found under {root}", path=root)


def safe_path(root: str | Path, relative: str, allow_outside: bool = False, record: str | None = None) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (``../``, absolute) unless allowed."""
    from r3v.errors import DataError

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
