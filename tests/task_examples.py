"""One fixed, real-format example per registered task (two where a task words prompts two ways).

Each comes from the task's own fixture files in tests/fixtures (or, for clevr-synth, its seeded
generator), so the prompt snapshots and the round-trip checks see what the loaders produce.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from r3v.records import Example
from r3v.registry import tasks

FIXTURES = Path(__file__).resolve().parent / "fixtures"

#: snapshot key -> (task name, split, fixture folder or None, example id)
CASES = {
    "chartqa": ("chartqa", "test", "chartqa", "human-1"),
    "clevr-math": ("clevr-math", "test", "clevr_math/r3v", "1"),
    "clevr-synth": ("clevr-synth", "test", None, "test-0"),
    "geoqa": ("geoqa", "test", "geoqa", "test-0"),
    "m3cot": ("m3cot", "test", "m3cot", "physics-101"),
    "miniwob": ("miniwob", "train", "miniwob", "enter-text-0-1"),  # has a previous action
    "tabmwp": ("tabmwp", "test", "tabmwp", "101"),  # free text, with a unit
    "tabmwp-choices": ("tabmwp", "test", "tabmwp", "106"),  # multiple choice: other wording
}


@cache
def all_examples(name: str) -> tuple:
    """(task, every example of its fixture split): built once per test session."""
    task_name, split, folder, _ = next(case for case in CASES.values() if case[0] == name)
    task = tasks.get(task_name)()
    data_dir = FIXTURES / folder if folder else None
    return task, tuple(task.load(split, data_dir, limit=300))


def case(key: str) -> tuple[object, Example]:
    """(task, example) of one snapshot case."""
    task_name, _, _, example_id = CASES[key]
    task, examples = all_examples(task_name)
    return task, next(ex for ex in examples if ex.id == example_id)
