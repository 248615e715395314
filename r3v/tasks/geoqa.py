"""``geoqa``: GeoQA (Chen et al., ACL Findings 2021) as R3V evaluates it: four numeric options, a letter.

Data, local (``--data-dir``): R3V's processed ``geoQA-data`` folder (the folder or its parent):
``<split>.jsonl`` (R3V writes JSON arrays under that name; real JSON lines are read too) with
records ``{"id", "question", "choices", "answer" (letter or 0-based index), "image", "domain"?,
"topic"?}`` and images in ``images/<image>`` (a name may use "\\" separators). For train, the
LLaMA-Factory file ``geoqa_train_base.json`` (``{"messages": [user, assistant], "images": [path]}``)
is read too; its image paths are absolute paths on the authors' machine, so only the file name is
kept and looked up in ``images/``. Hub: ``hz2475/geoQA`` (unofficial port: one ``train`` split
filtered by ``original_split``; question text in ``subject``, gold index in ``label``).

Judges (``judge=``):

- ``"letter"`` (default, deterministic). The scope is the text after the last answer marker
  ("answer", "answer is", "Answer:", "[Answer]"; case-insensitive), cut before any "[Rationale]" /
  "[Context]"; with no marker (or nothing after it) the scope is the last non-empty line. In the
  scope, candidates are: an upper-case letter opening it ("B", "(B)", "option B"), any "(X)", and
  any option written out ("40.0", or a number equal to it such as "40"). After a marker the
  earliest candidate wins, on a last line the latest. A letter outside the options, or no
  candidate, is no answer. There is no random credit and no "last letter anywhere".
- ``"r3v"``: R3V's ``judge_answer`` (hhhwmws0117/MM-self-improve-qwen2vl
  ``data_process/geoqa/calculate.py``) step by step: keep the text after the last lower-case
  "answer"; the last "(X)", else the last ASCII letter anywhere (so "Answer: 40.0" reads "R"); only
  with no letter at all, the option-text and letter-token fallbacks of M3CoT's judge. Its last
  branch, which R3V scores as correct with probability 0.75 (unseeded), is scored as wrong here.
  Letters outside the options are reported as no answer (never correct in R3V either).

The official GeoQA metric executes a predicted program; it does not apply to free-form output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import (
    OPTION_LETTERS,
    check_split,
    format_options,
    local_image,
    option_letter,
    raise_or_record,
)
from r3v.tasks.m3cot import (
    BadRecord,
    choice_fallbacks,
    first_existing,
    hub_rows,
    letter_in_range,
    open_hub_image,
    optional_text,
    parse_choices,
    parse_gold_letter,
    read_json_records,
    require,
)

HF_DATASET = "hz2475/geoQA"
#: ``original_split`` values of the hub port that make up each split (its exact spelling is unknown).
HUB_SPLIT_NAMES = {"train": {"train"}, "val": {"val", "dev", "validation"}, "test": {"test"}}
JUDGES = ("letter", "r3v")

COT_INSTRUCTION = (
    "Answer the question with Chain-of-Thought as short as possible without losing accuracy. "
    'Finally answer with option from choices with prefix "Answer: ".'
)

_MARKER = re.compile(r"\banswer\b\]?(?:\s+is\b)?\s*[:：]?", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"[^\w(]*(?:(?i:option|choice)\s*)?\(?([A-Z])\)?(?!\w)")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\.?\d)")
_ANY_LETTER = re.compile(r"[A-Za-z]")
_SHAREGPT_OPTION = re.compile(r"\(([A-Z])\) ?(.*)")
_SHAREGPT_ANSWER = re.compile(r"Answer:\s*\(?([A-Z])\)?\s*$")


def letter_judge(text: str, choices: Sequence[str]) -> str | None:
    """The default deterministic judge (see the module docstring): a letter, or None."""
    markers = list(_MARKER.finditer(text))
    scope = text[markers[-1].end() :] if markers else ""
    scope = scope.split("[Rationale]")[0].split("[Context]")[0]
    after_marker = bool(scope.strip(" \t\n\r.:：*-"))
    if not after_marker:
        lines = [line for line in text.splitlines() if line.strip()]
        scope = lines[-1] if lines else ""
    candidates: list[tuple[int, int, str]] = []  # (position, option order, letter)
    leading = _LEADING_LETTER.match(scope)
    if leading:
        candidates.append((leading.start(1), -1, leading.group(1)))
    candidates += [(m.start(), -1, m.group(1).upper()) for m in _PAREN_LETTER.finditer(scope)]
    for index, choice in enumerate(choices):
        letter = OPTION_LETTERS[index]
        candidates += [(start, index, letter) for start in _option_positions(scope, choice)]
    if not candidates:
        return None
    candidates.sort()
    return candidates[0][2] if after_marker else candidates[-1][2]


def _option_positions(scope: str, choice: str) -> list[int]:
    """Where the option's text, or a number equal to it, is written in ``scope``."""
    choice = choice.strip()
    if not choice:
        return []
    pattern = re.compile(r"(?<![\w.])" + re.escape(choice) + r"(?!\w|\.\d)", re.IGNORECASE)
    positions = [m.start() for m in pattern.finditer(scope)]
    value = _as_float(choice)
    if value is not None:
        positions += [
            m.start() for m in _NUMBER.finditer(scope) if math.isclose(float(m.group()), value, rel_tol=1e-9, abs_tol=1e-9)
        ]
    return positions


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def r3v_judge(text: str, choices: Sequence[str]) -> str | None:
    """R3V's GeoQA ``judge_answer`` with its random branch scored as wrong (None)."""
    if "answer" in text:
        text = text.split("answer")[-1]
    found = _PAREN_LETTER.findall(text) or _ANY_LETTER.findall(text)
    if found:
        return found[-1].upper()
    return choice_fallbacks(text, [str(c) for c in choices])


@tasks.register("geoqa")
class GeoQA:
    """GeoQA geometry multiple choice (R3V's processed data); deterministic letter judge or R3V parity."""

    name = "geoqa"
    splits = ("train", "val", "test")
    sources = f"local dir: R3V geoQA-data/<split>.jsonl + images/ (or geoqa_train_base.json); hub: {HF_DATASET}"
    #: Only some processed copies carry these; the breakdown lists what the data has.
    breakdown_keys = ("domain", "topic")

    def __init__(
        self,
        judge: str = "letter",
        hf_dataset: str = HF_DATASET,
        skip_bad: bool = False,
        allow_outside_paths: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        if judge not in JUDGES:
            raise ValueError(f"geoqa judge must be one of {', '.join(JUDGES)}, not {judge!r}")
        self.judge = judge
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
            return self._load_hub(split, limit)
        root = Path(data_dir)
        names = [f"{split}.jsonl", f"{split}.json", f"geoqa_{split}_base.json"]
        found = first_existing(root, names + [f"geoQA-data/{name}" for name in names])
        if not found:
            raise DataError(f"geoqa: none of {', '.join(names)} found under {root} (or its geoQA-data/)", path=root)
        path = found[0]
        examples = []
        for index, record in enumerate(read_json_records(path)):
            if limit is not None and len(examples) >= limit:
                break
            label = _label(record, index)
            try:
                examples.append(self._local_example(record, path.parent / "images", label))
            except BadRecord as exc:
                self._bad(DataError(str(exc), path=path, record=label), exc)
        return examples

    def _local_example(self, record: dict[str, Any], images_root: Path, label: str) -> Example:
        if "messages" in record:
            record = _from_sharegpt(record)
        example = self.example_from_record(record, 0)
        image = require(record, "image", str)
        try:
            example.images = [str(local_image(images_root, image, self.allow_outside_paths, True, label))]
        except DataError as exc:
            raise BadRecord(exc.problem) from exc
        return example

    def _load_hub(self, split: str, limit: int | None) -> list[Example]:
        rows = hub_rows(self.hf_dataset, split, self.cache_dir, hub_split="train")
        wanted = HUB_SPLIT_NAMES[split]
        seen: set[str] = set()
        examples = []
        for index, row in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            seen.add(str(row.get("original_split")))
            if row.get("original_split") not in wanted:
                continue
            label = _label(row, index)
            try:
                record = {
                    "id": require(row, "id", (int, str)),
                    "question": require(row, "subject", str),
                    "choices": row.get("choices"),
                    "answer": require(row, "label", int),
                    "original_split": row.get("original_split"),
                }
                example = self.example_from_record(record, index)
                example.images = [open_hub_image(row.get("image"))]
                examples.append(example)
            except BadRecord as exc:
                self._bad(DataError(str(exc), path=self.hf_dataset, record=label), exc)
        if not examples and not self.bad_records and limit != 0:
            raise DataError(
                f"no rows with original_split in {sorted(wanted)}; the data has {sorted(seen)}", path=self.hf_dataset
            )
        return examples

    def _bad(self, error: DataError, cause: Exception) -> None:
        raise_or_record(error, self.skip_bad, self.bad_records, cause)

    def example_from_record(self, record: dict[str, Any], index: int) -> Example:
        """An Example from one R3V record: ``id``, ``question``, ``choices``, ``answer`` (letter or
        0-based index); ``domain`` and ``topic`` when present. The image is not needed for scoring."""
        if not isinstance(record, dict):
            raise BadRecord("record is not a JSON object")
        raw_id = require(record, "id", (str, int))
        question = require(record, "question", str)
        choices = parse_choices(require(record, "choices", (list, tuple)))
        if "answer" not in record:
            raise BadRecord("missing field 'answer'")
        metadata = {key: optional_text(record, key) for key in ("domain", "topic", "original_split")}
        return Example(
            id=str(raw_id),
            task=self.name,
            question=question,
            answer=parse_gold_letter(record["answer"], len(choices)),
            choices=choices,
            metadata={k: v for k, v in metadata.items() if v},
        )

    # prompts ------------------------------------------------------------------------------------

    def body(self, example: Example) -> str:
        """R3V's query layout: the question, then ``Choices:`` and ``(A) x`` lines."""
        return f"{example.question}\nChoices:\n{format_options(example.choices or [])}"

    def cot_prompt(self, example: Example) -> str:
        return f"{self.body(example)}\n{COT_INSTRUCTION}"

    def qa_prompt(self, example: Example) -> str:
        return f'{self.body(example)}\nAnswer with the option\'s letter from the given choices directly, with prefix "Answer: ".'

    def answer_line(self, answer: Any, example: Example) -> str:
        """A bare letter, as R3V's GeoQA rationales end (``Answer: B``)."""
        return f"Answer: {option_letter(answer)}"

    def select_instruction(self, example: Example) -> str:
        return 'Which prediction is correct? Finally answer with option from choices with prefix "Answer: ".'

    # scoring ------------------------------------------------------------------------------------

    def extract(self, text: str, example: Example) -> str | None:
        choices = example.choices or []
        judge = r3v_judge if self.judge == "r3v" else letter_judge
        return letter_in_range(judge(text, choices), choices) if isinstance(text, str) else None

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip().upper()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and self.normalize(answer, example) == example.answer


def _label(record: Any, index: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), str | int) and not isinstance(record.get("id"), bool):
        return str(record["id"])
    return f"#{index}"


def _from_sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    """An R3V record from a LLaMA-Factory sharegpt item (``geoqa_train_base.json``)."""
    messages = require(record, "messages", list)
    images = require(record, "images", list)
    if len(messages) < 2 or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages[:2]):
        raise BadRecord("'messages' should hold a user and an assistant turn with text content")
    if not images or not isinstance(images[0], str):
        raise BadRecord("'images' should list one image path")
    user = messages[0]["content"].replace("<image>", "", 1)
    question, sep, rest = user.rpartition("\nChoices:\n")
    if not sep:
        raise BadRecord("the user turn has no 'Choices:' block")
    choices = []
    for line in rest.split("\n"):
        option = _SHAREGPT_OPTION.fullmatch(line)
        if not option or option.group(1) != OPTION_LETTERS[len(choices)]:
            break  # the options end where an instruction line starts
        choices.append(option.group(2))
    gold = _SHAREGPT_ANSWER.search(messages[1]["content"])
    if not gold:
        raise BadRecord(f"cannot read the gold letter from {messages[1]['content']!r}")
    # the stored paths are absolute on the authors' machine: keep the file name only
    name = PureWindowsPath(images[0]).name
    return {"id": name.rsplit(".", 1)[0], "question": question, "choices": choices, "answer": gold.group(1), "image": name}
