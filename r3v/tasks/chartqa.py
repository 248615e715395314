"""``chartqa``: ChartQA (Masry et al., ACL Findings 2022), scored as R3V does, or by relaxed accuracy.

Data: the official ``ChartQA Dataset`` folder (``<split>/<split>_human.json``,
``<split>/<split>_augmented.json``, charts in ``<split>/png/``), or a Hugging Face dataset:
``HuggingFaceM4/ChartQA`` (``query``, ``label`` list, ``human_or_machine``) or ``lmms-lab/ChartQA``
(``type``, ``question``, ``answer``). R3V evaluates on the human-written test questions only, so
``subset="human"`` is the default; ``"augmented"`` and ``"both"`` are there for the usual
two-part report (``metadata["source"]`` says which part a question is from).

Extraction (R3V): the text after the first "Answer:", stripped; the whole output when there is none.

Scoring, default (R3V ``is_ans_correct``): correct when both sides parse as floats and differ by at
most 5% of the gold value, otherwise when they are equal ignoring case and surrounding spaces.
With ``relaxed=True`` (pix2struct's ``relaxed_correctness``, used by lmms-eval): a trailing "%" is
read as a percentage, the 5% rule applies only to a non-zero gold value, and strings compare
ignoring case but not surrounding spaces. Where the gold is a list (HuggingFaceM4), any entry counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r3v.errors import DataError
from r3v.records import Example
from r3v.reference import REFERENCE_A_VALUE_TARGET
from r3v.registry import tasks
from r3v.tasks import base

DEFAULT_HUB = "HuggingFaceM4/ChartQA"
SUBSETS = ("human", "augmented")
INSTRUCTION = "a numerical value, Yes/No, or a word or phrase."
COT = f"First generate a step-by-step solution, then answer the question with {INSTRUCTION}"
QA = f"Answer the question with {INSTRUCTION}"
SELECT = f"Which prediction is correct? Give the final answer with {INSTRUCTION}"
TOLERANCE = 0.05

_AFTER_ANSWER = re.compile(r"Answer:\s*(.+)\s*$", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """R3V's ``extract_answer``: everything after the first "Answer:" (stripped), else the whole text.

    None when that leaves nothing (an empty output, or "Answer:" followed only by spaces).
    """
    match = _AFTER_ANSWER.search(text)
    answer = match.group(1).strip() if match else text.strip()
    return answer or None


def r3v_correct(prediction: str, label: str) -> bool:
    """R3V ``is_ans_correct``: 5% relative tolerance when both parse as floats, else exact match."""
    try:
        predicted, gold = float(prediction.strip()), float(label.strip())
        if abs(predicted - gold) <= TOLERANCE * abs(gold):
            return True
    except ValueError:
        pass
    return prediction.strip().lower() == label.strip().lower()


def _relaxed_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, label: str) -> bool:
    """pix2struct ``relaxed_correctness``: percentages understood, tolerance only for a non-zero gold."""
    predicted, gold = _relaxed_float(prediction), _relaxed_float(label)
    if predicted is not None and gold:
        return abs(predicted - gold) / abs(gold) <= TOLERANCE
    return prediction.lower() == label.lower()


def _canonical_number(value: float) -> str:
    # "14", "14.0" and "1.4e1" are one answer for a vote
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _labels(record: dict, keys: tuple[str, ...], where: base.Where) -> list[str]:
    """A gold label: a string (official files, lmms-lab) or a non-empty list of strings (HuggingFaceM4)."""
    key = base.present_key(record, keys, where)
    value = record[key]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"field {key!r} should be a string or a non-empty list of strings, got {value!r}", **where)


@dataclass(frozen=True)
class ChartQAOptions(base.HubOptions):
    #: Hub id or local parquet/json file, used when no data dir is given ("" for none).
    hf_dataset: str | None = DEFAULT_HUB
    #: Which questions: the human-written ones (R3V's test set), the augmented ones, or both.
    subset: Literal["human", "augmented", "both"] = "human"
    #: pix2struct's relaxed accuracy instead of R3V's rule.
    relaxed: bool = False


@tasks.register("chartqa")
class ChartQA(base.InstructionPrompts, base.TaskBase):
    """ChartQA from the official folder or a hub copy, scored by R3V's rule or relaxed accuracy."""

    name = "chartqa"
    splits = ("train", "val", "test")
    sources = (
        "local dir (vis-nlp/ChartQA 'ChartQA Dataset': <split>/<split>_{human,augmented}.json + <split>/png/); "
        f"hub: {DEFAULT_HUB} (default), lmms-lab/ChartQA"
    )
    breakdown_keys = ("source",)
    metadata_keys = ("source", "labels", "imgname")
    Options = ChartQAOptions
    #: Reference A trained self-select on the bare value here (not ``Answer: X``).
    reference = REFERENCE_A_VALUE_TARGET
    cot_instruction, qa_instruction, select_text = COT, QA, SELECT

    @property
    def _wanted(self) -> tuple[str, ...]:
        return SUBSETS if self.options.subset == "both" else (self.options.subset,)

    # ---------------------------------------------------------------- loading
    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        if data_dir is None:
            return self._load_hub(split, limit)
        examples: list[Example] = []
        for source in self._wanted:
            path = base.resolve_data_file(data_dir, f"{split}/{split}_{source}.json", task=self.name)
            records = base.read_json(path)
            if not isinstance(records, list):
                raise DataError(f"expected a JSON list of records, got {type(records).__name__}", path=path)

            def build(index: int, record: Any, source: str = source, path: Path = path) -> Example:
                return self._build(record, index, source, Path(data_dir), split, path)

            examples += self.collect(records, build, None if limit is None else limit - len(examples))
        return examples

    def example_from_record(
        self, record: dict, index: int, data_dir: str | Path | None = None, split: str = "test"
    ) -> Example:
        """One official record (``imgname``, ``query``, ``label``), or one in lmms-lab's names
        (``question``, ``answer``, ``type``). ``source`` (human/augmented) or ``type`` set the part;
        human when neither is given, as R3V scores test_human.
        """
        where = {"path": None, "record": f"index {index}"}
        record = base.object_record(record, where)
        raw = record.get("source", record.get("type", "human"))
        source = _lmms_source(raw)
        if source is None:
            raise DataError(f"source should be human or augmented, got {raw!r}", **where)
        return self._build(record, index, source, Path(data_dir) if data_dir else None, split, None)

    def _build(
        self, record: Any, index: int, source: str, root: Path | None, split: str, path: Path | None
    ) -> Example:
        where = {"path": path, "record": f"index {index}"}
        record = base.object_record(record, where)
        question = base.text_field(record, ("query", "question"), where)
        labels = _labels(record, ("label", "answer"), where)
        # scoring needs no chart, so a record without a data dir may leave the image name out
        imgname = base.text_field(record, "imgname", where) if root is not None or "imgname" in record else ""
        images = []
        if root is not None:
            images.append(str(self.local_image(root, f"{split}/png/{imgname}", where)))
        return self._example(f"{source}-{index}", question, labels, images, source, imgname)

    def _example(self, id_: str, query: str, labels: list[str], images: list, source: str, imgname: str) -> Example:
        return Example(
            id=id_,
            task=self.name,
            question=query,
            answer=labels[0],
            images=images,
            metadata={"source": source, "labels": labels, "imgname": imgname},
        )

    def _load_hub(self, split: str, limit: int | None) -> list[Example]:
        data = self.hub_rows(split, "the 'ChartQA Dataset' folder")
        name = self.options.hf_dataset
        columns = set(data.column_names)
        if {"query", "label", "human_or_machine", "image"} <= columns:
            question_key, label_key, source_of = "query", "label", _m4_source
            source_values = data["human_or_machine"]
        elif {"question", "answer", "type", "image"} <= columns:
            question_key, label_key, source_of = "question", "answer", _lmms_source
            source_values = data["type"]
        else:
            raise DataError(
                f"unrecognised columns {sorted(columns)}: expected HuggingFaceM4/ChartQA "
                "(image, query, label, human_or_machine) or lmms-lab/ChartQA (image, question, answer, type)",
                path=name,
            )
        seen = dict.fromkeys(SUBSETS, 0)

        def build(row_index: int, raw_source: Any) -> Example | None:
            where = {"path": name, "record": f"row {row_index}"}
            source = source_of(raw_source)
            if source is None:
                raise DataError(f"unknown question source {raw_source!r}", **where)
            # numbered per source as the official files are; ids match them where the hub copy keeps their order
            number = seen[source]
            seen[source] += 1
            if source not in self._wanted:
                return None
            row = data[row_index]
            labels = _labels(row, (label_key,), where)
            question = base.text_field(row, question_key, where)
            image = base.hub_image(row["image"], where)
            return self._example(f"{source}-{number}", question, labels, [image], source, _image_name(row["image"]))

        return self.collect(source_values, build, limit)

    # ---------------------------------------------------------------- scoring
    def extract(self, text: str, example: Example) -> str | None:
        return extract_answer(text)

    def normalize(self, answer: str, example: Example) -> str:
        """Numbers in one canonical form (a trailing % read as a percentage under ``relaxed``), text lowercased."""
        text = answer.strip()
        value = _relaxed_float(text) if self.options.relaxed else _plain_float(text)
        return _canonical_number(value) if value is not None else text.lower()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        if answer is None:
            return False
        labels = example.metadata.get("labels") or [str(example.answer)]
        judge = relaxed_correct if self.options.relaxed else r3v_correct
        return any(judge(answer, label) for label in labels)


def _plain_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _m4_source(value: Any) -> str | None:
    # HuggingFaceM4/ChartQA: ClassLabel 0 = human, 1 = machine (the augmented questions)
    return {0: "human", 1: "augmented", "human": "human", "machine": "augmented"}.get(value)


def _lmms_source(value: Any) -> str | None:
    # lmms-lab/ChartQA: "human_test" / "augmented_test" (also plain "human" / "augmented")
    if isinstance(value, str):
        for source in SUBSETS:
            if value.startswith(source):
                return source
    return None


def _image_name(value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return Path(path).name if isinstance(path, str) else ""
