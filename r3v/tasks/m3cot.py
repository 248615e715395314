"""``m3cot``: M3CoT (Chen et al., ACL 2024), multi-domain multi-step multi-modal chain of thought.

Data: the Hugging Face dataset ``LightChen2333/M3CoT`` (splits train / validation / test; the
official evaluation uses test), or a local copy of it: ``<split>.jsonl`` with the same fields
(``image`` a path relative to the folder) or the parquet files (``<split>.parquet`` or the hub's
``data/<split>-*.parquet``).

Scoring reproduces the official ``judge_answer`` of LightChen233/M3CoT ``utils/metric.py``:

1. if the output contains ``[Answer]``, keep the part after the last ``[Answer]`` and before any
   ``[Rationale]`` / ``[Context]``;
2. the last ``(X)`` (any ASCII letter, upper-cased);
3. else every option whose text occurs in the output (case-insensitive substring) and take the one
   with the highest option index (not the latest position);
4. else replace ``\\n . , ! ?`` by spaces, split on single spaces, and take the highest-index option
   letter present as an upper-case token; 5. else the same with lower-case tokens; else no answer.

Correct iff the letter equals the gold letter. Deliberate differences, none of which changes a
verdict: a letter outside the options (e.g. ``(E)`` with four options) is reported as no answer
(it can never equal the gold letter), and options past the sixth get letters G, H, ... where the
official code would crash. Accuracy breaks down by ``domain`` and ``topic``.

This module also holds the small record helpers the other multiple-choice task (GeoQA) shares.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import (
    OPTION_LETTERS,
    check_split,
    format_options,
    load_hub_split,
    local_image,
    option_letter,
    raise_or_record,
)

HF_DATASET = "LightChen2333/M3CoT"

_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_TOKEN_BREAKS = re.compile(r"[\n.,!?]")


# --- record helpers shared by the multiple-choice tasks -------------------------------------------


class BadRecord(ValueError):
    """One record breaks the schema; loaders turn it into a DataError naming file and record."""


def require(record: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise BadRecord(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadRecord(f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def optional_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} should be a string, got {type(value).__name__}")
    return value


def parse_choices(value: Any) -> list[str]:
    """Options as strings. Numbers are accepted (GeoQA stores some as numbers) and printed as str()."""
    if not isinstance(value, list | tuple) or not value:
        raise BadRecord(f"field 'choices' should be a non-empty list, got {value!r}")
    if len(value) > len(OPTION_LETTERS):
        raise BadRecord(f"{len(value)} choices; at most {len(OPTION_LETTERS)} are supported")
    out = []
    for choice in value:
        if isinstance(choice, bool) or not isinstance(choice, str | int | float):
            raise BadRecord(f"choice {choice!r} is not a string")
        out.append(str(choice))
    return out


def parse_gold_letter(answer: Any, n_choices: int) -> str:
    """The gold option letter from a letter ("B") or a 0-based index (1), checked against the options."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in OPTION_LETTERS:
        index = OPTION_LETTERS.index(answer.strip().upper())
    else:
        raise BadRecord(f"answer {answer!r} is neither an option letter nor an option index")
    if not 0 <= index < n_choices:
        raise BadRecord(f"answer {answer!r} is outside the {n_choices} choices")
    return OPTION_LETTERS[index]


def letter_in_range(letter: str | None, choices: Sequence[str] | None) -> str | None:
    """``letter`` upper-cased if it names one of the options, else None."""
    if letter is None or choices is None:
        return None
    letter = letter.strip().upper()
    if len(letter) == 1 and letter in OPTION_LETTERS[: len(choices)]:
        return letter
    return None


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records from a file that is either one JSON array or JSON lines (R3V names arrays ``.jsonl``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8: {exc}", path=path) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array of records, got {type(data).__name__}", path=path)
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, record=f"#{index}")
    return data


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc}", path=path, record=f"line {number}") from exc
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, record=f"line {number}")
        records.append(record)
    return records


def open_hub_image(cell: Any) -> Image.Image | str:
    """A ``datasets`` Image cell read with ``decode=False``: opened lazily from its bytes (the pixels
    load on first use, so a whole split does not sit decoded in memory), or its path."""
    if isinstance(cell, dict) and cell.get("bytes"):
        try:
            return Image.open(io.BytesIO(cell["bytes"]))
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadRecord(f"cannot read the image: {exc}") from exc
    if isinstance(cell, dict) and cell.get("path"):
        return str(cell["path"])
    raise BadRecord("has no image")


def hub_rows(dataset: str, split: str, cache_dir: str | None, hub_split: str | None = None) -> Any:
    """One split of a hub dataset (id, local folder or parquet file) with images left undecoded."""
    import datasets

    try:
        rows = load_hub_split(dataset, hub_split or split, **({"cache_dir": cache_dir} if cache_dir else {}))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"cannot load split {hub_split or split!r} of {dataset}: {exc}", path=dataset) from exc
    if "image" in rows.column_names:
        rows = rows.cast_column("image", datasets.Image(decode=False))
    return rows


def first_existing(root: Path, patterns: Sequence[str]) -> list[Path]:
    """The files matching the first pattern (glob) that matches anything under ``root``."""
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found
    return []


def official_judge_letter(text: str, choices: Sequence[str]) -> str | None:
    """The letter M3CoT's ``judge_answer`` reads from ``text``; None where it gives up ("FAILED")."""
    if "[Answer]" in text:
        text = text.split("[Answer]")[-1].split("[Rationale]")[0].split("[Context]")[0]
    found = _PAREN_LETTER.findall(text)
    if found:
        return found[-1].upper()
    return choice_fallbacks(text, choices)


def choice_fallbacks(text: str, choices: Sequence[str]) -> str | None:
    """Steps 3-5 of the official judge (see the module docstring); both M3CoT and R3V's GeoQA use them."""
    lowered = text.lower()
    hits = [i for i, choice in enumerate(choices) if str(choice).lower() in lowered]
    if not hits:
        tokens = _TOKEN_BREAKS.sub(" ", text).split(" ")
        hits = [i for i in range(len(choices)) if OPTION_LETTERS[i] in tokens]
        if not hits:
            hits = [i for i in range(len(choices)) if OPTION_LETTERS[i].lower() in tokens]
    return OPTION_LETTERS[hits[-1]] if hits else None


# --- the task --------------------------------------------------------------------------------------


@tasks.register("m3cot")
class M3CoT:
    """M3CoT multiple choice (science, commonsense, mathematics) with the official judge."""

    name = "m3cot"
    splits = ("train", "validation", "test")
    sources = f"hub: {HF_DATASET}; local dir: <split>.jsonl or <split>.parquet / data/<split>-*.parquet"
    breakdown_keys = ("domain", "topic")

    def __init__(
        self,
        hf_dataset: str = HF_DATASET,
        skip_bad: bool = False,
        allow_outside_paths: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        self.hf_dataset = hf_dataset
        self.skip_bad = skip_bad
        self.allow_outside_paths = allow_outside_paths
        self.cache_dir = cache_dir
        #: Errors of the records skipped by the last ``load`` (only with ``skip_bad``).
        self.bad_records: list[str] = []

    # loading ------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, self.splits, split)
        self.bad_records = []
        if data_dir is None:
            source = self.hf_dataset
            rows = hub_rows(self.hf_dataset, split, self.cache_dir)
            return self._examples(rows, source, None, limit)
        root = Path(data_dir)
        jsonl = first_existing(root, [f"{split}.jsonl", f"{split}.json"])
        if jsonl:
            return self._examples(read_json_records(jsonl[0]), jsonl[0], root, limit)
        parquet = first_existing(root, [f"{split}.parquet", f"data/{split}-*.parquet"])
        if parquet:
            # one file loads as is; hub-style shards load through the folder, as the hub lays them out
            source = parquet[0] if len(parquet) == 1 else root
            return self._examples(hub_rows(str(source), split, self.cache_dir), source, None, limit)
        raise DataError(
            f"m3cot: no {split}.jsonl, {split}.parquet or data/{split}-*.parquet under {root}", path=root
        )

    def _examples(self, rows: Any, source: Any, images_root: Path | None, limit: int | None) -> list[Example]:
        examples = []
        for index, record in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            label = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
            try:
                examples.append(self._from_dataset_record(record, images_root, source, label))
            except BadRecord as exc:
                raise_or_record(DataError(str(exc), path=source, record=label), self.skip_bad, self.bad_records, exc)
        return examples

    def _from_dataset_record(self, record: dict[str, Any], images_root: Path | None, source: Any, label: str) -> Example:
        example = self.example_from_record(record, 0)
        cell = record.get("image")
        if images_root is None:
            image = open_hub_image(cell)
        else:
            if not isinstance(cell, str) or not cell:
                raise BadRecord("field 'image' should be an image path relative to the data folder")
            try:
                image = str(local_image(images_root, cell, self.allow_outside_paths, True, label))
            except DataError as exc:
                raise BadRecord(exc.problem) from exc
        example.images = [image]
        return example

    def example_from_record(self, record: dict[str, Any], index: int) -> Example:
        """An Example from one record with M3CoT's field names (images are not needed for scoring).

        Needs ``id``, ``choices``, ``answer``; reads ``question``, ``context``, ``domain``, ``topic``,
        ``category``, ``image_id`` and ``rationale`` when present.
        """
        if not isinstance(record, dict):
            raise BadRecord("record is not a JSON object")
        raw_id = require(record, "id", (str, int))
        choices = parse_choices(require(record, "choices", (list, tuple)))
        if "answer" not in record:
            raise BadRecord("missing field 'answer'")
        gold = parse_gold_letter(record["answer"], len(choices))
        metadata = {key: optional_text(record, key) for key in ("domain", "topic", "category", "image_id")}
        metadata = {k: v for k, v in metadata.items() if v}
        rationale = optional_text(record, "rationale")
        if rationale:
            metadata["rationale"] = rationale
        return Example(
            id=str(raw_id),
            task=self.name,
            question=optional_text(record, "question"),
            answer=gold,
            choices=choices,
            metadata={"context": optional_text(record, "context"), **metadata},
        )

    def prediction_from_record(self, record: dict[str, Any]) -> str | None:
        """The model output of a scoring record: ``prediction``, or else the last of M3CoT's ``messages``
        (the format of the official ``evaluate.py --setting custom``)."""
        if "prediction" in record:
            return record["prediction"] if isinstance(record["prediction"], str) else None
        messages = record.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], str):
            return messages[-1]
        return None

    # prompts ------------------------------------------------------------------------------------

    def body(self, example: Example) -> str:
        """M3CoT's own layout, as in its experiment files: optional context, question, choices."""
        parts = []
        context = example.metadata.get("context") or ""
        if context:
            parts.append(f"[Context]\n{context}")
        parts.append(f"[Question]\n{example.question}")
        parts.append(f"[Choices]\n{format_options(example.choices or [])}")
        return "\n".join(parts)

    def cot_prompt(self, example: Example) -> str:
        return (
            f"{self.body(example)}\n\nLet's think step-by-step! "
            'Then give the final answer on the last line as "Answer: (X)", where X is the letter of the correct option.'
        )

    def qa_prompt(self, example: Example) -> str:
        return f"{self.body(example)}\n\nAnswer with the option's letter from the given choices directly."

    def answer_line(self, answer: Any, example: Example) -> str:
        """The letter in parentheses, which the official judge reads before anything else."""
        return f"Answer: ({option_letter(answer)})"

    def select_instruction(self, example: Example) -> str:
        return 'Which prediction is correct? Give the final answer as "Answer: (X)" with the letter of the correct option.'

    # scoring ------------------------------------------------------------------------------------

    def extract(self, text: str, example: Example) -> str | None:
        if not isinstance(text, str):
            return None
        return letter_in_range(official_judge_letter(text, example.choices or []), example.choices)

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip().upper()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and self.normalize(answer, example) == example.answer
