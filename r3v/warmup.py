"""The warm-up's distilled chain-of-thought: read from a file, or written by a task's own teacher.

Two file formats are read (chosen by the file's first character: ``[`` or ``{``):

1. **R3V's warm-up JSON** (e.g. ``qwenvl_sft_gpt.json``): a list of records
   ``{"image": "name.png", "conversations": [{"from": "user", "value": PROMPT},
   {"from": "assistant", "value": TARGET}]}``. Images resolve against an image root (the file's
   folder unless given) and may not escape it. ``"image"`` may be absent or null for text-only
   records. A leading ``<image>`` placeholder in the prompt is dropped: r3v attaches images itself.

2. **r3v's distill JSONL**, tied to the task's own examples: one object per line,
   ``{"example_id": ID, "prompt": PROMPT, "target": TARGET}``. ``r3v distill`` writes exactly this.
   ``example_id`` must name a question of the task's train split (its images are used); the
   ``target`` should end in the task's answer line (``Answer: X``). Optional keys: ``"task"`` (must
   match the task in use), ``"correct": false`` (a teacher rationale with a wrong answer: skipped,
   since training on it would teach the error); others (e.g. ``"teacher"``) are ignored.

Both become ``TrainItem(kind="distill")``. A malformed record raises a DataError naming the file
and the record.

With no file, a task that has ``teacher_rationale(example)`` (clevr-synth) provides the warm-up
CoT itself for a subset of its train split: the stand-in for the paper's GPT-distilled set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.io import iter_jsonl
from r3v.records import Example, TrainItem
from r3v.tasks.base import Task, safe_path

#: Size of the programmatic teacher's warm-up set: the paper distils 800 to 1,000 per dataset;
#: a small set keeps the warmed-up model weak enough for self-training to have room.
DEFAULT_TEACHER_COUNT = 200


def read_r3v_warmup(
    path: str | Path,
    image_root: str | Path | None = None,
    allow_outside: bool = False,
    check_images: bool = True,
) -> list[TrainItem]:
    """Items from R3V's warm-up JSON (a list of ``image`` + two-turn ``conversations`` records)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"warm-up file not found: {path}", path=path) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"not valid JSON: {exc}", path=path) from exc
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", path=path)
    items = []
    for index, record in enumerate(data):
        prompt, target = _conversation(record, path, index)
        images = _record_images(record, root, path, index, allow_outside, check_images)
        items.append(TrainItem("distill", f"{path.stem}#{index}", prompt, target, images=images))
    return items


def _conversation(record: Any, path: Path, index: int) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", path=path, record=index)
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2:
        raise DataError("'conversations' must be a list of one user turn then one assistant turn", path=path, record=index)
    roles = [turn.get("from") if isinstance(turn, dict) else None for turn in turns]
    if roles != ["user", "assistant"]:
        raise DataError(f"expected turns from user then assistant, got {roles}", path=path, record=index)
    values = [turn.get("value") for turn in turns]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise DataError("each turn needs a non-empty string 'value'", path=path, record=index)
    prompt = values[0].strip()
    while prompt.startswith("<image>"):
        prompt = prompt[len("<image>") :].lstrip()
    return prompt, values[1].strip()


def _record_images(
    record: dict, root: Path, path: Path, index: int, allow_outside: bool, check_images: bool
) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    names = image if isinstance(image, list) else [image]
    if not all(isinstance(name, str) and name for name in names):
        raise DataError(f"'image' must be a file name or a list of them, got {image!r}", path=path, record=index)
    resolved = []
    for name in names:
        try:
            file = safe_path(root, name, allow_outside=allow_outside, record=str(index))
        except DataError as exc:
            raise DataError(exc.problem, path=path, record=index) from exc
        if check_images and not file.is_file():
            raise DataError(f"image {name!r} not found under {root}", path=path, record=index)
        resolved.append(str(file))
    return resolved


def read_distill_jsonl(
    path: str | Path, examples: Mapping[str, Example], task_name: str | None = None
) -> list[TrainItem]:
    """Items from a distill JSONL (``example_id``, ``prompt``, ``target``) tied to ``examples``.

    A record's optional ``task`` must match ``task_name`` when both are known: ids like
    ``train-3`` exist in several tasks, and another task's rationales would train nonsense.
    """
    path = Path(path)
    items = []
    for line, record in iter_jsonl(path):
        where = f"line {line}"
        if task_name is not None and record.get("task") not in (None, task_name):
            raise DataError(f"written for task {record['task']!r}, not {task_name!r}", path=path, record=where)
        for key in ("example_id", "prompt", "target"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"needs a non-empty string {key!r}", path=path, record=where)
        if record["example_id"] not in examples:
            raise DataError(
                f"example_id {record['example_id']!r} is not a question of the train split in use",
                path=path,
                record=where,
            )
        if record.get("correct") is False:
            continue
        items.append(TrainItem("distill", record["example_id"], record["prompt"].strip(), record["target"].strip()))
    return items


def read_warmup_file(
    path: str | Path,
    examples: Mapping[str, Example],
    image_root: str | Path | None = None,
    allow_outside: bool = False,
    task_name: str | None = None,
) -> list[TrainItem]:
    """Distilled CoT items from either format; the file's first character tells which."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"warm-up file not found: {path}", path=path)
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return read_r3v_warmup(path, image_root=image_root, allow_outside=allow_outside)
    if head.startswith(b"{"):
        return read_distill_jsonl(path, examples, task_name)
    raise DataError("expected R3V warm-up JSON (a list) or distill JSONL (one object per line)", path=path)


def teacher_items(task: Task, examples: Sequence[Example], count: int = DEFAULT_TEACHER_COUNT) -> list[TrainItem]:
    """The task's programmatic teacher on the first ``count`` questions: CoT prompt → rationale."""
    teacher = task.teacher_rationale
    if teacher is None:
        raise ValueError(f"task {task.name!r} has no programmatic teacher (teacher_rationale)")
    return [TrainItem("distill", ex.id, task.cot_prompt(ex), teacher(ex)) for ex in examples[:count]]


def has_teacher(task: Task) -> bool:
    return task.teacher_rationale is not None


def distill_items(
    task: Task,
    examples: Sequence[Example],
    warmup_file: str | Path | None = None,
    image_root: str | Path | None = None,
    teacher_count: int = DEFAULT_TEACHER_COUNT,
    allow_outside: bool = False,
) -> list[TrainItem]:
    """The warm-up CoT: from ``warmup_file`` when given, else the task's teacher, else none."""
    if warmup_file is not None:
        by_id = {ex.id: ex for ex in examples}
        return read_warmup_file(warmup_file, by_id, image_root, allow_outside, task.name)
    if has_teacher(task):
        return teacher_items(task, examples, teacher_count)
    return []
