"""What differs between two runs of the same work: measured times. Tests that compare a resumed
run with an uninterrupted one compare everything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def without_seconds(value: Any) -> Any:
    """``value`` with every key that holds a measured time (its name has "seconds") left out."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def jsonl_without_seconds(path: str | Path) -> list[Any]:
    """A JSON-lines file's records, in order, without their measured times."""
    return [without_seconds(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
