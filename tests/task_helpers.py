"""Small helpers the task tests share: copying a fixture folder with one data file edited, reading
R3V's warm-up conversations, and catching a load error to look at its message."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from r3v.errors import DataError


def copy_with_edit(source: Path, dest: Path, data_file: str, mutate: Callable[[Any], Any]) -> Path:
    """``source`` copied to ``dest`` with the JSON file ``data_file`` passed through ``mutate`` (in place)."""
    shutil.copytree(source, dest)
    data = json.loads((dest / data_file).read_text())
    mutate(data)
    (dest / data_file).write_text(json.dumps(data))
    return dest


def warmup_turns(shared_fixtures: Path, name: str) -> list[tuple[dict, str, str]]:
    """(record, prompt, rationale) of each conversation in R3V's warm-up sample ``r3v_warmup/<name>``."""
    records = json.loads((shared_fixtures / "r3v_warmup" / name).read_text())
    turns = []
    for record in records:
        prompt, rationale = (turn["value"] for turn in record["conversations"])
        turns.append((record, prompt, rationale))
    return turns


def load_error(task: Any, split: str, data_dir: Path, match: str) -> DataError:
    """The DataError ``task.load(split, data_dir)`` raises; fails unless its message matches ``match``."""
    with pytest.raises(DataError, match=match) as info:
        task.load(split, data_dir)
    return info.value
