"""``tabmwp``: TabMWP table math word problems (Lu et al., ICLR 2023), scored as PromptPG and R3V do.

Data: PromptPG's ``data/tabmwp`` folder: ``problems_<split>.json`` (an object keyed by pid) and
``tables/<pid>.png``. There is no official Hugging Face dataset, so only local files load.

Scoring follows PromptPG's ``extract_prediction`` + ``normalize_answer`` with R3V's additions (an
``Answer: X`` pattern tried first), and is exact match of the normalised strings, case-insensitive.
Deliberate differences, each deterministic where the reference is not; ``scoring=official``
(on with ``--reference``) restores all three, with a seeded draw for the first:

* A multiple-choice letter that names no option (e.g. "E" with four options) is treated like a
  letter outside A-F in the reference: that pattern is skipped and the next one is tried, ending
  in the word-overlap rule. The reference picks a random option instead.
* An empty or whitespace-only output extracts to None. The reference's word-overlap rule picks
  the first option (A) of a multiple-choice question for it.
* A number that cannot be evaluated ("1/0", "1.2.3") stays as text, so it matches only an
  identical gold string. R3V maps it to "0" (which then matches gold 0); pass
  ``unparseable_as_zero=True`` to reproduce that.

A letter beyond F is accepted when the question has that many options (TabMWP never has more
than six, so this never differs from the reference in practice).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import (
    OPTION_LETTERS,
    DataOptions,
    TaskBase,
    field,
    format_options,
    object_record,
    read_json,
    resolve_data_file,
)

COT_MC = "First generate a step-by-step solution, then answer with the option\u2019s letter from the given choices directly."
COT_FREE = "First generate a step-by-step solution, then answer the question using a single word or phrase."
QA_MC = "Answer with the option\u2019s letter from the given choices directly."
QA_FREE = "Answer the question using a single word or phrase."
SELECT = "Which prediction has the right OCR, reasoning and calculations? Give the final answer."

# --- output clean-up, applied before any pattern (PromptPG) ---
_LATEX_FRACTION = re.compile(r"\$?\\frac\{([\d.,\-]+)\}\{([\d.,]+)\}\$?")
_FINAL_PERIOD = re.compile(r"(?<![AP]\.M)\.$")  # keep the period of "7:25 P.M."
_GLUED_EQUALS = re.compile(r"(?<=\d)=(?=[\-$\d])")

# --- multiple choice: the first hit of the first matching pattern names the letter ---
_LETTER_PATTERNS = [
    re.compile(p)
    for p in (
        r"Answer: ([A-Za-z])",  # R3V's addition, tried first
        r"^\(([A-Za-z])\)$",
        r"^([A-Za-z])$",
        r"^([A-Za-z]). ",
        r"[Th]he answer is ([A-Z])",
        r"^\(([A-Za-z])\) [\s\S]+$",
        r"[Th]he answer is \(([A-Za-z])\) [\s\S]+$",
    )
]

# --- free text: the last hit of the first matching pattern is the answer ---
_FREE_PATTERNS = [
    re.compile(p)
    for p in (
        r"Answer: ([\s\S]+)",  # R3V's addition: everything after the first "Answer: "
        r"[Th]he answer is ([\s\S]+)$",
        r"[Th]he table shows that ([\d$.,/:]+) ",
        r" = ([\d$.,/:]+)",
        r"(?<= be| is) ([\-\d$.,/:]{0,}[\d]+)",
        r"(?<= are| was) ([\-\d$.,/:]{0,}[\d]+)",
        r"(?<= were) ([\-\d$.,/:]{0,}[\d]+)",
        r" ([\d$.,/:]+ [AP]\.M\.)",
        r"([\-\d$.,/:]{0,}[\d]+)",
    )
]

# --- normalisation (PromptPG normalize_answer) ---
_LEADING_DOLLAR = re.compile(r"^\$")
_TRAILING_MARK = re.compile(r"[,./]$")
_NUMBER_LIKE = re.compile(r"^[-+]?[\d,./]+$")
_INTEGER = re.compile(r"[-+]?\d+$")
_ZERO_DECIMALS = re.compile(r"\.0+$")


def clean_output(text: str) -> str:
    """PromptPG's pre-clean: LaTeX fractions to a/b, one final period off, ``3=4`` spaced, U+2212 to '-'."""
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    text = _FINAL_PERIOD.sub("", text)
    text = _GLUED_EQUALS.sub(" = ", text)
    return text.replace("\u2212", "-")


def word_overlap(option: str, output: str) -> float:
    """PromptPG's option similarity: 2 for identity, else shared space-separated words over the longer count."""
    if option == output:
        return 2.0
    if " " not in option and " " not in output:
        return 0.0
    option_words, output_words = option.split(" "), output.split(" ")
    shared = set(option_words) & set(output_words)
    return len(shared) / max(len(option_words), len(output_words))


#: The letters the reference takes as option letters; one past the options draws a random option.
REFERENCE_LETTERS = "ABCDEF"


def extract_prediction(output: str, choices: list[str] | None, draw: random.Random | None = None) -> str:
    """The predicted answer in a model output: an option's text for multiple choice, else a string.

    Reproduces PromptPG/R3V ``extract_prediction`` except that a letter naming no option falls
    through to the next pattern instead of picking a random option (see the module docstring).
    With ``draw`` (official scoring), a letter in A-F past the options picks an option from it.
    """
    text = clean_output(output)
    if choices:
        for pattern in _LETTER_PATTERNS:
            match = pattern.search(text)
            if match is None:
                continue
            letter = match.group(1).upper()
            index = OPTION_LETTERS.find(letter)
            if 0 <= index < len(choices):
                return choices[index]
            if draw is not None and letter in REFERENCE_LETTERS:
                return choices[draw.randrange(len(choices))]
        scores = [word_overlap(option, text) for option in choices]
        return choices[scores.index(max(scores))]  # ties: the first option, as numpy.argmax
    for pattern in _FREE_PATTERNS:
        hits = pattern.findall(text)
        if hits:
            prediction = hits[-1].strip()
            if prediction.endswith(".") and ".M." not in prediction:
                prediction = prediction[:-1]
            return prediction
    return text


def _number_value(digits: str) -> int | float:
    if _INTEGER.match(digits):
        return int(digits)
    if "/" in digits:
        parts = digits.split("/")
        return round(float(parts[0]) / float(parts[1]), 3)
    return round(float(digits), 3)


def normalize_answer(text: str, unit: str | None, unparseable_as_zero: bool = False) -> str:
    """PromptPG ``normalize_answer``: numbers to a canonical decimal string, text without its unit.

    "$1,000" -> "1000", "3.50" -> "3.5", "3/10" -> "0.3", "5 books" (unit "books") -> "5".
    A number-like string that does not evaluate stays as it is, or becomes "0" when
    ``unparseable_as_zero`` (R3V's behaviour for predictions).
    """
    text = _LEADING_DOLLAR.sub("", text)
    text = _TRAILING_MARK.sub("", text)
    if not _NUMBER_LIKE.match(text):
        return text.replace(unit, "").strip() if unit else text
    try:
        value = _number_value(text.replace(",", ""))
    except (ValueError, ZeroDivisionError, OverflowError):
        return "0" if unparseable_as_zero else text
    return _ZERO_DECIMALS.sub("", str(value))


def grade_band(grade: int) -> str:
    """The official breakdown groups grades 1-6 and 7-8."""
    if 1 <= grade <= 6:
        return "1-6"
    if 7 <= grade <= 8:
        return "7-8"
    return str(grade)


@dataclass(frozen=True)
class TabMWPOptions(DataOptions):
    #: R3V's mapping of unevaluable numbers to "0" (see the module docstring).
    unparseable_as_zero: bool = False


@tasks.register("tabmwp")
class TabMWP(TaskBase):
    name = "tabmwp"
    splits = ("train", "dev", "test", "test1k", "dev1k")
    sources = (
        "local dir (PromptPG data/tabmwp: problems_<split>.json + tables/<pid>.png); "
        "no official Hugging Face dataset"
    )
    breakdown_keys = ("ques_type", "ans_type", "grade")
    metadata_keys = ("pid", "unit", "ques_type", "ans_type", "grade", "grade_level", "table_title", "table", "solution")
    Options = TabMWPOptions

    # ---------------------------------------------------------------- loading
    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        path = resolve_data_file(data_dir, f"problems_{split}.json", task=self.name)
        problems = read_json(path)
        if not isinstance(problems, dict):
            raise DataError(f"expected a JSON object keyed by pid, got {type(problems).__name__}", path=path)
        return self.collect(problems.items(), lambda _, item: self._build(item[1], item[0], Path(data_dir), path),
                            limit)

    def example_from_record(self, record: dict, index: int, data_dir: str | Path | None = None) -> Example:
        """One problem dict (with its ``pid``; the index stands in when it has none)."""
        record = object_record(record, {"record": f"index {index}"})
        pid = record.get("pid", str(index))
        return self._build(record, str(pid), Path(data_dir) if data_dir else None, None)

    def _build(self, problem: Any, pid: str, root: Path | None, path: Path | None) -> Example:
        where = {"path": path, "record": f"pid {pid}"}
        problem = object_record(problem, where)
        question = field(problem, "question", str, where)
        answer = field(problem, "answer", str, where)
        unit = field(problem, "unit", str, where, optional=True)
        choices = field(problem, "choices", list, where, optional=True)
        if choices is not None:
            if not all(isinstance(c, str) for c in choices):
                raise DataError("field 'choices' should be a list of strings", **where)
            if len(choices) > len(OPTION_LETTERS):
                raise DataError(f"{len(choices)} choices; at most {len(OPTION_LETTERS)} are supported", **where)
            if choices and answer not in choices:
                raise DataError(f"answer {answer!r} is not one of the choices {choices}", **where)
        grade = field(problem, "grade", int, where)
        metadata = {
            "pid": pid,
            "unit": unit,
            "ques_type": field(problem, "ques_type", str, where),
            "ans_type": field(problem, "ans_type", str, where),
            "grade": grade_band(grade),
            "grade_level": grade,
            "table_title": field(problem, "table_title", str, where, optional=True),
            "table": field(problem, "table", str, where, optional=True),
            "solution": field(problem, "solution", str, where, optional=True),
        }
        images = []
        if root is not None:
            images.append(str(self.local_image(root, f"tables/{pid}.png", where)))
        return Example(
            id=pid,
            task=self.name,
            question=question,
            answer=answer,
            images=images,
            choices=list(choices) if choices else None,
            metadata=metadata,
        )

    # ---------------------------------------------------------------- prompts
    def _question_block(self, example: Example) -> str:
        unit = example.metadata.get("unit")
        text = f"{example.question} (Unit: {unit})" if unit else example.question
        if example.choices:
            text += f"\nOptions:\n{format_options(example.choices)}"
        return text

    def cot_prompt(self, example: Example) -> str:
        instruction = self.options.cot_instruction or (COT_MC if example.choices else COT_FREE)
        return f"{self._question_block(example)}\n{instruction}"

    def qa_prompt(self, example: Example) -> str:
        return f"{self._question_block(example)}\n{QA_MC if example.choices else QA_FREE}"

    def answer_line(self, answer: Any, example: Example) -> str:
        """``Answer: <x>``; for multiple choice, the letter of the option whose text is ``answer``."""
        answer = str(answer)
        if example.choices and answer in example.choices:
            return f"Answer: {OPTION_LETTERS[example.choices.index(answer)]}"
        return f"Answer: {answer}"

    def select_instruction(self, example: Example) -> str:
        return SELECT

    # ---------------------------------------------------------------- scoring
    def extract(self, text: str, example: Example) -> str | None:
        official = self.options.scoring == "official"
        if not text.strip():
            return example.choices[0] if official and example.choices else None
        draw = self.official_draw(example, text) if official else None
        prediction = extract_prediction(text, example.choices, draw)
        return prediction or None

    def _normalized(self, answer: str, example: Example, as_zero: bool) -> str:
        return normalize_answer(answer, example.metadata.get("unit"), as_zero).lower()

    def normalize(self, answer: str, example: Example) -> str:
        as_zero = self.options.unparseable_as_zero or self.options.scoring == "official"
        return self._normalized(answer, example, as_zero)

    def is_correct(self, answer: str | None, example: Example) -> bool:
        if answer is None:
            return False
        return self.normalize(answer, example) == self._normalized(str(example.answer), example, False)
