"""File writes that survive a kill: atomic replaces and append-only JSONL with a validated tail."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from r3v.errors import DataError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def iter_jsonl(path: str | Path, skip_bad: bool = False, bad: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a JSON-lines file.

    A malformed line raises a DataError that names the file and line, unless ``skip_bad`` is set;
    then it is recorded in ``bad`` and skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}", path=path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except (UnicodeDecodeError, ValueError) as exc:
                error = DataError(f"malformed JSON line: {exc}", path=path, record=f"line {number}")
                if not skip_bad:
                    raise error from exc
                if bad is not None:
                    bad.append(str(error))
                continue
            yield number, record


def repair_jsonl_tail(path: str | Path) -> int:
    """Cut a torn last line (left by a kill mid-write) off an append-only JSONL file.

    Returns the number of bytes removed. Only the final line may be torn; a malformed line
    elsewhere is real corruption and raises.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            keep = last_start
    if keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return len(data) - keep


def append_jsonl(handle, records: list[dict]) -> None:
    """Append whole lines and flush them to disk before returning."""
    handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    handle.flush()
    os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp:`` fill ``tmp``; on success it replaces ``out`` whole.

    The folder is built under a hidden temporary name beside ``out`` and renamed at the end, so a
    kill mid-way never leaves a half-written ``out`` that looks complete; on an error the
    temporary folder is removed and ``out`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there (or nothing)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
