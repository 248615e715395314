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

- ``"letter"`` (default, deterministic). Full-width characters are read as their ASCII forms
  ("答案：B", "（B）"). The scope is the text after the last answer marker ("answer", "answer is",
  "Answer:", "[Answer]", "答案"; case-insensitive), cut before any "[Rationale]" / "[Context]"; with
  no marker (or nothing after it) the scope is the last non-empty line. A scope that is one letter
  alone, in either case and maybe in brackets ("d", "(b).", "B"), is that letter. Otherwise the
  candidates are: an upper-case letter opening it ("B", "(B)", "option B"), any "(X)", and any
  option written out ("40.0", or a number equal to it such as "40"). After a marker the earliest
  candidate wins, on a last line the latest. A letter outside the options, or no candidate, is no
  answer. A lower-case letter inside a sentence ("the answer is a right angle") is no answer: it
  is a word. There is no random credit and no "last letter anywhere", the official judge's
  accidents ("Answer: 40.0" read as the letter R).
- ``"r3v"``: R3V's ``judge_answer`` (hhhwmws0117/MM-self-improve-qwen2vl
  ``data_process/geoqa/calculate.py``) step by step: keep the text after the last lower-case
  "answer"; the last "(X)", else the last ASCII letter anywhere (so "Answer: 40.0" reads "R"); only
  with no letter at all, the option-text and letter-token fallbacks of M3CoT's judge. Its last
  branch, which R3V scores as correct with probability 0.75 (unseeded), is scored as wrong here.
  Letters outside the options are reported as no answer (never correct in R3V either).

``scoring=official`` (on with ``--reference``) scores with R3V's ``judge_answer`` whatever
``judge`` says, its random branch included: an output that reaches it is read as the gold letter
with probability 0.75, drawn from ``scoring_seed``, the question and the output (so a rescoring
gives the same verdict).

The official GeoQA metric executes a predicted program; it does not apply to free-form output.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

from r3v.errors import DataError
from r3v.records import Example
from r3v.reference import REFERENCE_B
from r3v.registry import tasks
from r3v.tasks.base import (
    OPTION_LETTERS,
    ChoiceTask,
    HubOptions,
    InstructionPrompts,
    Where,
    choice_fallbacks,
    field,
    first_existing,
    format_options,
    hub_image,
    letter_in_range,
    option_letter,
    read_records,
    record_label,
    text_field,
)

HF_DATASET = "hz2475/geoQA"
#: ``original_split`` values of the hub port that make up each split (its exact spelling is unknown).
HUB_SPLIT_NAMES = {"train": {"train"}, "val": {"val", "dev", "validation"}, "test": {"test"}}

COT_INSTRUCTION = (
    "Answer the question with Chain-of-Thought as short as possible without losing accuracy. "
    'Finally answer with option from choices with prefix "Answer: ".'
)

_MARKER = re.compile(r"(?:\banswer\b|答案)\]?(?:\s+is\b)?\s*[:：]?", re.IGNORECASE)
_LONE_LETTER = re.compile(r"[\W_]*\(?([A-Za-z])\)?[\W_]*")
#: The share of outputs R3V's judge credits when it reads no answer from them.
R3V_RANDOM_CREDIT = 0.75
_LEADING_LETTER = re.compile(r"[^\w(]*(?:(?i:option|choice)\s*)?\(?([A-Z])\)?(?!\w)")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\.?\d)")
_ANY_LETTER = re.compile(r"[A-Za-z]")
_SHAREGPT_OPTION = re.compile(r"\(([A-Z])\) ?(.*)")
_SHAREGPT_ANSWER = re.compile(r"Answer:\s*\(?([A-Z])\)?\s*$")


def letter_judge(text: str, choices: Sequence[str]) -> str | None:
    """The default deterministic judge (see the module docstring): a letter, or None."""
    text = unicodedata.normalize("NFKC", text)
    markers = list(_MARKER.finditer(text))
    scope = text[markers[-1].end() :] if markers else ""
    scope = scope.split("[Rationale]")[0].split("[Context]")[0]
    after_marker = bool(scope.strip(" \t\n\r.:：*-"))
    if not after_marker:
        lines = [line for line in text.splitlines() if line.strip()]
        scope = lines[-1] if lines else ""
    lone = _LONE_LETTER.fullmatch(scope)
    if lone:
        return lone.group(1).upper()
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


@dataclass(frozen=True)
class GeoQAOptions(HubOptions):
    hf_dataset: str | None = HF_DATASET
    #: "letter": the deterministic judge; "r3v": R3V's own (see the module docstring).
    judge: Literal["letter", "r3v"] = "letter"


@tasks.register("geoqa")
class GeoQA(InstructionPrompts, ChoiceTask):
    """GeoQA geometry multiple choice (R3V's processed data); deterministic letter judge or R3V parity."""

    name = "geoqa"
    splits = ("train", "val", "test")
    sources = f"local dir: R3V geoQA-data/<split>.jsonl + images/ (or geoqa_train_base.json); hub: {HF_DATASET}"
    #: Only some processed copies carry these; the breakdown lists what the data has.
    breakdown_keys = ("domain", "topic")
    metadata_keys = ("domain", "topic", "original_split")
    Options = GeoQAOptions
    reference = REFERENCE_B
    cot_instruction = COT_INSTRUCTION
    qa_instruction = 'Answer with the option\'s letter from the given choices directly, with prefix "Answer: ".'
    select_text = 'Which prediction is correct? Finally answer with option from choices with prefix "Answer: ".'

    # loading ------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        if data_dir is None:
            return self._load_hub(split, limit)
        root = Path(data_dir)
        names = [f"{split}.jsonl", f"{split}.json", f"geoqa_{split}_base.json"]
        found = first_existing(root, names + [f"geoQA-data/{name}" for name in names])
        if not found:
            raise DataError(f"geoqa: none of {', '.join(names)} found under {root} (or its geoQA-data/)", path=root)
        path = found[0]

        def build(index: int, record: dict[str, Any]) -> Example:
            where = {"path": path, "record": record_label(record, index)}
            if "messages" in record:
                record = _from_sharegpt(record, where)
            example = self.read_record(record, where)
            image = text_field(record, "image", where)
            example.images = [str(self.local_image(path.parent / "images", image, where))]
            return example

        return self.collect(read_records(path), build, limit)

    def _load_hub(self, split: str, limit: int | None) -> list[Example]:
        # the hub port has one train split; the official splits are told apart by original_split
        rows = self.hub_rows("train", "R3V's geoQA-data folder")
        wanted = HUB_SPLIT_NAMES[split]
        seen: set[str] = set()

        def build(index: int, row: dict[str, Any]) -> Example | None:
            seen.add(str(row.get("original_split")))
            if row.get("original_split") not in wanted:
                return None
            where = {"path": self.options.hf_dataset, "record": record_label(row, index)}
            record = {
                "id": field(row, "id", (int, str), where),
                "question": text_field(row, "subject", where),
                "choices": row.get("choices"),
                "answer": field(row, "label", int, where),
                "original_split": row.get("original_split"),
            }
            example = self.read_record(record, where)
            example.images = [hub_image(row.get("image"), where)]
            return example

        examples = self.collect(rows, build, limit)
        if not examples and not self.bad_records and limit != 0:
            raise DataError(
                f"no rows with original_split in {sorted(wanted)}; the data has {sorted(seen)}",
                path=self.options.hf_dataset,
            )
        return examples

    # prompts ------------------------------------------------------------------------------------

    def body(self, example: Example) -> str:
        """R3V's query layout: the question, then ``Choices:`` and ``(A) x`` lines."""
        return f"{example.question}\nChoices:\n{format_options(example.choices or [])}"

    def answer_line(self, answer: Any, example: Example) -> str:
        """A bare letter, as R3V's GeoQA rationales end (``Answer: B``)."""
        return f"Answer: {option_letter(answer)}"

    # scoring ------------------------------------------------------------------------------------

    def read_letter(self, text: str, choices: Sequence[str]) -> str | None:
        judge = r3v_judge if self.options.judge == "r3v" or self.options.scoring == "official" else letter_judge
        return judge(text, choices)

    def extract(self, text: str, example: Example) -> str | None:
        if self.options.scoring != "official" or not isinstance(text, str):
            return super().extract(text, example)
        letter = r3v_judge(text, example.choices or [])
        if letter is None:  # R3V's last branch: credited at random
            credited = self.official_draw(example, text).random() < R3V_RANDOM_CREDIT
            return str(example.answer) if credited else None
        return letter_in_range(letter, example.choices or [])


def _from_sharegpt(record: dict[str, Any], where: Where) -> dict[str, Any]:
    """An R3V record from a LLaMA-Factory sharegpt item (``geoqa_train_base.json``)."""
    messages = field(record, "messages", list, where)
    images = field(record, "images", list, where)
    if len(messages) < 2 or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages[:2]):
        raise DataError("'messages' should hold a user and an assistant turn with text content", **where)
    if not images or not isinstance(images[0], str):
        raise DataError("'images' should list one image path", **where)
    user = messages[0]["content"].replace("<image>", "", 1)
    question, sep, rest = user.rpartition("\nChoices:\n")
    if not sep:
        raise DataError("the user turn has no 'Choices:' block", **where)
    choices = []
    for line in rest.split("\n"):
        option = _SHAREGPT_OPTION.fullmatch(line)
        if not option or option.group(1) != OPTION_LETTERS[len(choices)]:
            break  # the options end where an instruction line starts
        choices.append(option.group(2))
    gold = _SHAREGPT_ANSWER.search(messages[1]["content"])
    if not gold:
        raise DataError(f"cannot read the gold letter from {messages[1]['content']!r}", **where)
    # the stored paths are absolute on the authors' machine: keep the file name only
    name = PureWindowsPath(images[0]).name
    return {"id": name.rsplit(".", 1)[0], "question": question, "choices": choices, "answer": gold.group(1), "image": name}
