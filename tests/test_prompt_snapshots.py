"""The exact prompts each task sends, pinned as text files under tests/snapshots/prompts/.

Comparing a prompt with the function that builds it can never fail; comparing it with a file can,
and a change in wording then shows up as a diff in review. To accept a deliberate change, rerun
with ``R3V_UPDATE_SNAPSHOTS=1`` and commit the rewritten files.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
from task_examples import CASES, case

from r3v.prompts import refine_prompt, select_prompt
from r3v.registry import tasks

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots" / "prompts"
UPDATE = os.environ.get("R3V_UPDATE_SNAPSHOTS") == "1"
KINDS = ("cot", "qa", "refine", "select")


def prompt(kind: str, task, example) -> str:
    """One of the four prompts the method trains and tests on, with fixed model outputs inside."""
    line = task.answer_line(example.answer, example)
    if kind == "cot":
        return task.cot_prompt(example)
    if kind == "qa":
        return task.qa_prompt(example)
    if kind == "refine":
        return refine_prompt(task, example, f"  Looking at the image step by step.\n{line}\n")
    candidates = [f"First, look at the image.\n{line}", "I cannot read the image.", f"Reading it again.\n{line}"]
    return select_prompt(task, example, candidates)


def snapshot_path(key: str, kind: str) -> Path:
    return SNAPSHOTS / f"{key}.{kind}.txt"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", sorted(CASES))
def test_prompt_matches_its_snapshot(key, kind):
    task, example = case(key)
    text = prompt(kind, task, example) + "\n"  # files end with a newline
    path = snapshot_path(key, kind)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no snapshot {path}; run with R3V_UPDATE_SNAPSHOTS=1 to write it", pytrace=False)
    stored = path.read_text(encoding="utf-8")
    if stored != text:
        diff = "".join(difflib.unified_diff(stored.splitlines(keepends=True), text.splitlines(keepends=True),
                                            fromfile=f"snapshot {path.name}", tofile="prompt now"))
        pytest.fail(f"the {kind} prompt of {key} changed (R3V_UPDATE_SNAPSHOTS=1 accepts it):\n{diff}", pytrace=False)


def test_every_task_has_snapshots_and_no_snapshot_is_stale():
    assert {task_name for task_name, *_ in CASES.values()} == set(tasks.names())
    expected = {snapshot_path(key, kind).name for key in CASES for kind in KINDS}
    present = {path.name for path in SNAPSHOTS.glob("*.txt")}
    assert present - expected == set(), "snapshots no case produces; delete them"
    if not UPDATE:
        assert expected - present == set()
