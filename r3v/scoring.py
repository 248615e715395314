"""Score model outputs that were generated elsewhere, with a task's own extraction and judge.

Input is JSON lines: one record per line in the benchmark's official field names plus
``prediction``, the raw model output (M3CoT also takes its official ``messages`` list, the last
message being the output). Each record becomes an Example through ``task.example_from_record``
(tasks without it get a generic reader of ``question`` / ``answer`` / ``choices`` / ``id``);
then ``task.extract`` and ``task.is_correct`` give the verdict. Blank lines are ignored.

A bad line (malformed JSON, invalid UTF-8, not an object, no ``prediction``, missing task fields)
raises a DataError naming the file and line. With ``skip_bad`` it is left out of the accuracy,
listed in ``ScoreReport.skipped``, and still gets a verdict ``{"correct": false, "answer": null,
"error": ...}`` so the verdicts stay one per input record, in input order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
from r3v.tasks.base import Task, json_lines


@dataclass
class Verdict:
    """The judgement of one input line (``line`` is 1-based)."""

    line: int
    correct: bool
    answer: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "correct": self.correct, "answer": self.answer}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class ScoreReport:
    task: str
    n: int
    correct: int
    #: ``{key: {value: {"n": int, "accuracy": float}}}`` for each of the task's breakdown keys the data has.
    breakdown: dict[str, dict[str, dict[str, Any]]]
    verdicts: list[Verdict] = field(default_factory=list)
    #: One message per skipped line (naming file and line).
    skipped: list[str] = field(default_factory=list)
    #: Which scorer gave the verdicts: the task's ``scoring`` option ("r3v" or "official") and,
    #: for "official", the seed of its draws.
    scoring: dict[str, Any] = field(default_factory=lambda: {"scoring": "r3v"})

    @property
    def accuracy(self) -> float:
        """Fraction correct in [0, 1]; 0.0 when nothing was scored."""
        return self.correct / self.n if self.n else 0.0

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, "accuracy": self.accuracy, "breakdown": self.breakdown,
                **self.scoring}


def scoring_behaviour(task: Task) -> dict[str, Any]:
    """The scorer a task's options select, for the records: ``{"scoring": ...}`` (+ its seed)."""
    options = task.options
    scoring = getattr(options, "scoring", "r3v")  # a plug-in's options may have no such field
    if scoring == "official":
        return {"scoring": scoring, "scoring_seed": options.scoring_seed}
    return {"scoring": scoring}


def score_file(task: Task, path: str | Path, skip_bad: bool = False, task_name: str | None = None) -> ScoreReport:
    """Score every record of a JSON-lines file with ``task`` (an instance of a registered task)."""
    path = Path(path)
    name = task_name or task.name
    verdicts: list[Verdict] = []
    skipped: list[str] = []
    scored: list[tuple[Example, bool]] = []
    for number, record in json_lines(path):
        error = record if isinstance(record, DataError) else None
        if error is None:
            try:
                text = prediction_of(task, record)
                example = example_of(task, name, record, len(verdicts))
            except DataError as exc:
                error = DataError(exc.problem, path=path, record=f"line {number}")
        if error is not None:
            if not skip_bad:
                raise error
            skipped.append(str(error))
            verdicts.append(Verdict(number, False, None, error.problem))
            continue
        answer = task.extract(text, example)
        correct = bool(task.is_correct(answer, example))
        verdicts.append(Verdict(number, correct, answer))
        scored.append((example, correct))
    if not verdicts:
        raise DataError("no records to score (the file is empty)", path=path)
    return ScoreReport(
        task=name,
        n=len(scored),
        correct=sum(correct for _, correct in scored),
        breakdown=breakdown(scored, task.breakdown_keys),
        verdicts=verdicts,
        skipped=skipped,
        scoring=scoring_behaviour(task),
    )


def prediction_of(task: Task, record: dict[str, Any]) -> str:
    """The raw model output of a record (a task may read it from its own field names)."""
    reader = task.prediction_from_record
    text = reader(record) if reader is not None else record.get("prediction")
    if not isinstance(text, str):
        if "prediction" in record:
            raise DataError(f"'prediction' should be a string, got {type(record['prediction']).__name__}")
        raise DataError("missing field 'prediction' (the raw model output)")
    return text


def example_of(task: Task, task_name: str, record: dict[str, Any], index: int) -> Example:
    """``task.example_from_record``, with its schema errors turned into DataErrors."""
    builder = task.example_from_record
    try:
        if builder is None:
            return generic_example(task_name, record, index, task.breakdown_keys)
        return builder(record, index)
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DataError(problem) from exc


def generic_example(task_name: str, record: dict[str, Any], index: int, breakdown_keys: tuple[str, ...] = ()) -> Example:
    """An Example for a task without ``example_from_record``: ``answer`` (required), ``question``,
    ``choices``, ``id``, and the task's breakdown keys as metadata."""
    if "answer" not in record:
        raise DataError("missing field 'answer'")
    return Example(
        id=str(record.get("id", index)),
        task=task_name,
        question=str(record.get("question", "")),
        answer=record["answer"],
        choices=record.get("choices"),
        metadata={key: record[key] for key in breakdown_keys if key in record},
    )


def breakdown(scored: list[tuple[Example, bool]], keys: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """Accuracy per value of each key. Examples without a value for a key are left out of that key;
    a key no example has is left out."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in keys:
        groups: dict[str, list[bool]] = defaultdict(list)
        for example, correct in scored:
            value = example.metadata.get(key)
            if value is not None and value != "":
                groups[str(value)].append(correct)
        if groups:
            out[key] = {
                value: {"n": len(flags), "accuracy": sum(flags) / len(flags)} for value, flags in sorted(groups.items())
            }
    return out
