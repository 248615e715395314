"""Real-format examples of every registered task, found without a list of tasks.

A task's fixture data is ``tests/fixtures/<module>`` (its module name: ``clevr_math`` for
``clevr-math``), or the first sub-folder of it, that ``task.load`` reads for one of the task's
splits ("test" tried first). A task whose options are not ``DataOptions`` reads no data files
(clevr-synth renders its own) and loads without a folder. So a benchmark added as one module plus
its fixture folder is picked up by every test that uses these examples.

``CASES`` are the examples the prompt snapshots pin: one per task (its first fixture example),
with ``SNAPSHOT_PICKS`` choosing a more telling example where there is one. A new task needs no
entry there; its snapshot files are written by ``R3V_UPDATE_SNAPSHOTS=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import DataOptions, Task

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass(frozen=True)
class FixtureData:
    """Where a task's fixture examples load from: a split and a folder (None: the task's own source)."""

    task: str
    split: str
    folder: Path | None

    def load(self) -> tuple[Task, tuple[Example, ...]]:
        task = tasks.get(self.task)()
        return task, tuple(task.load(self.split, self.folder))


def reads_files(task: Task) -> bool:
    return issubclass(task.Options, DataOptions)


@cache
def fixture_sets(name: str) -> tuple[FixtureData, ...]:
    """Every (folder, split) under the task's fixture folder that loads examples, the folder itself
    first, then its sub-folders in name order, "test" before the other splits; empty when the task
    has no fixture folder."""
    task = tasks.get(name)()
    splits = sorted(task.splits, key=lambda split: split != "test")  # test first, then the task's order
    if not reads_files(task):
        return (FixtureData(name, splits[0], None),)
    root = FIXTURES / name.replace("-", "_")
    if not root.is_dir():
        return ()
    found = []
    for folder in [root, *sorted(path for path in root.rglob("*") if path.is_dir())]:
        for split in splits:
            try:
                examples = task.load(split, folder, limit=1)
            except DataError:
                continue  # not this split's files (or not a data folder at all)
            if examples:
                found.append(FixtureData(name, split, folder))
    return tuple(found)


def fixture_data(name: str) -> FixtureData | None:
    """The task's first fixture set (see ``fixture_sets``), or None."""
    sets = fixture_sets(name)
    return sets[0] if sets else None


#: snapshot key -> (task name, split, fixture folder or None, example id), for the examples the
#: snapshots show instead of a task's first one.
SNAPSHOT_PICKS = {
    "chartqa": ("chartqa", "test", "chartqa", "human-1"),
    "clevr-math": ("clevr-math", "test", "clevr_math/r3v", "1"),  # R3V's layout, not CLEVR-Math's
    "clevr-synth": ("clevr-synth", "test", None, "test-0"),
    "grid-count": ("grid-count", "test", None, "test-0"),
    "geoqa": ("geoqa", "test", "geoqa", "test-0"),
    "m3cot": ("m3cot", "test", "m3cot", "physics-101"),
    "miniwob": ("miniwob", "train", "miniwob", "enter-text-0-1"),  # has a previous action
    "tabmwp": ("tabmwp", "test", "tabmwp", "101"),  # free text, with a unit
    "tabmwp-choices": ("tabmwp", "test", "tabmwp", "106"),  # multiple choice: other wording
}


def _cases() -> dict[str, tuple[str, str, str | None, str]]:
    cases = dict(SNAPSHOT_PICKS)
    picked = {task_name for task_name, *_ in SNAPSHOT_PICKS.values()}
    for name in tasks.names():
        data = fixture_data(name) if name not in picked else None
        if data is not None:
            _, examples = data.load()
            folder = str(data.folder.relative_to(FIXTURES)) if data.folder else None
            cases[name] = (name, data.split, folder, examples[0].id)
    return cases


#: snapshot key -> (task name, split, fixture folder or None, example id)
CASES = _cases()


@cache
def all_examples(name: str) -> tuple:
    """(task, every example of its fixture split): built once per test session."""
    task_name, split, folder, _ = next(case for case in CASES.values() if case[0] == name)
    task = tasks.get(task_name)()
    data_dir = FIXTURES / folder if folder else None
    return task, tuple(task.load(split, data_dir, limit=300))


def case(key: str) -> tuple[Task, Example]:
    """(task, example) of one snapshot case."""
    task_name, _, _, example_id = CASES[key]
    task, examples = all_examples(task_name)
    return task, next(ex for ex in examples if ex.id == example_id)
