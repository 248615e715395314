"""Errors r3v raises on bad input. Each names the file and the record at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, a malformed record, an unreadable image."""

    def __init__(self, message: str, path: str | Path | None = None, record: str | int | None = None):
        self.path = str(path) if path is not None else None
        self.record = record
        self.problem = message
        where = []
        if path is not None and str(path) not in message:
            where.append(f"file {path}")
        if record is not None and record != "?":
            where.append(f"record {record}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ModelOutputError(ValueError):
    """A model output that cannot be parsed where parsing is required."""


class BackendError(RuntimeError):
    """A generation backend failed in a way a retry will not fix (HTTP 4xx, exhausted retries...)."""
