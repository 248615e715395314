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
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
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


def _labels(record: dict, keys: tuple[str, ...], where: dict) -> list[str]:
    """A gold label: a string (official files, lmms-lab) or a non-empty list of strings (HuggingFaceM4)."""
    key = base.present_key(record, keys, where)
    value = record[key]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"field {key!r} should be a string or a non-empty list of strings, got {value!r}", **where)


@tasks.register("chartqa")
class ChartQA:
    """ChartQA from the official folder or a hub copy, scored by R3V's rule or relaxed accuracy."""

    name = "chartqa"
    splits = ("train", "val", "test")
    sources = (
        "local dir (vis-nlp/ChartQA 'ChartQA Dataset': <split>/<split>_{human,augmented}.json + <split>/png/); "
        f"hub: {DEFAULT_HUB} (default), lmms-lab/ChartQA"
    )
    breakdown_keys = ("source",)

    def __init__(
        self,
        subset: str = "human",
        relaxed: bool = False,
        hf_dataset: str | None = DEFAULT_HUB,
        cache_dir: str | None = None,
        skip_bad: bool = False,
        check_images: bool = True,
        allow_outside_paths: bool = False,
    ) -> None:
        """``subset``: human | augmented | both. ``relaxed``: pix2struct relaxed accuracy instead of R3V's rule.
        ``hf_dataset``: hub id or local parquet/json file, used when no data dir is given ("" for none);
        ``cache_dir``: the ``datasets`` cache for it.
        ``skip_bad``: skip malformed records (listed in ``bad_records``) instead of raising.
        ``check_images``: a record whose chart file is missing counts as malformed.
        Flags also accept "true"/"false", as ``r3v score --task-arg`` passes them.
        """
        if subset not in (*SUBSETS, "both"):
            raise ValueError(f"chartqa subset must be human, augmented or both, not {subset!r}")
        self.subset = subset
        self.relaxed = base.flag("relaxed", relaxed)
        self.hf_dataset = hf_dataset or None
        self.cache_dir = cache_dir
        self.skip_bad = base.flag("skip_bad", skip_bad)
        self.check_images = base.flag("check_images", check_images)
        self.allow_outside_paths = base.flag("allow_outside_paths", allow_outside_paths)
        self.bad_records: list[str] = []

    @property
    def _wanted(self) -> tuple[str, ...]:
        return SUBSETS if self.subset == "both" else (self.subset,)

    # ---------------------------------------------------------------- loading
    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        base.check_split(self.name, self.splits, split)
        self.bad_records = []
        if data_dir is None:
            if self.hf_dataset is None:
                raise DataError("chartqa needs --data-dir (the 'ChartQA Dataset' folder) or a hub dataset id")
            return self._load_hub(split, limit)
        examples: list[Example] = []
        for source in self._wanted:
            path = base.resolve_data_file(data_dir, f"{split}/{split}_{source}.json", task=self.name)
            records = base.read_json(path)
            if not isinstance(records, list):
                raise DataError(f"expected a JSON list of records, got {type(records).__name__}", path=path)
            for index, record in enumerate(records):
                if limit is not None and len(examples) >= limit:
                    return examples
                try:
                    examples.append(self._build(record, index, source, Path(data_dir), split, path))
                except DataError as exc:
                    self._bad(exc)
        return examples

    def _bad(self, error: DataError) -> None:
        base.raise_or_record(error, self.skip_bad, self.bad_records)

    def example_from_record(
        self, record: dict, index: int, data_dir: str | Path | None = None, split: str = "test"
    ) -> Example:
        """One official record (``imgname``, ``query``, ``label``), or one in lmms-lab's names
        (``question``, ``answer``, ``type``). ``source`` (human/augmented) or ``type`` set the part;
        human when neither is given, as R3V scores test_human.
        """
        where = {"path": None, "record": f"index {index}"}
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", **where)
        raw = record.get("source", record.get("type", "human"))
        source = _lmms_source(raw)
        if source is None:
            raise DataError(f"source should be human or augmented, got {raw!r}", **where)
        return self._build(record, index, source, Path(data_dir) if data_dir else None, split, None)

    def _build(
        self, record: Any, index: int, source: str, root: Path | None, split: str, path: Path | None
    ) -> Example:
        where = {"path": path, "record": f"index {index}"}
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", **where)
        question = base.text_field(record, ("query", "question"), where)
        labels = _labels(record, ("label", "answer"), where)
        # scoring needs no chart, so a record without a data dir may leave the image name out
        imgname = base.text_field(record, ("imgname",), where) if root is not None or "imgname" in record else ""
        images = []
        if root is not None:
            relative = f"{split}/png/{imgname}"
            image = base.local_image(root, relative, self.allow_outside_paths, self.check_images, where["record"])
            images.append(str(image))
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
        name = self.hf_dataset
        data = base.load_hub_undecoded(name, split, cache_dir=self.cache_dir)
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
        examples: list[Example] = []
        seen = dict.fromkeys(SUBSETS, 0)
        for row_index, raw_source in enumerate(source_values):
            if limit is not None and len(examples) >= limit:
                break
            where = {"path": name, "record": f"row {row_index}"}
            source = source_of(raw_source)
            if source is None:
                self._bad(DataError(f"unknown question source {raw_source!r}", **where))
                continue
            # numbered per source as the official files are; ids match them where the hub copy keeps their order
            number = seen[source]
            seen[source] += 1
            if source not in self._wanted:
                continue
            try:
                row = data[row_index]
                labels = _labels(row, (label_key,), where)
                question = base.text_field(row, (question_key,), where)
                image = base.hub_image(row["image"], where)
            except DataError as exc:
                self._bad(exc)
                continue
            examples.append(
                self._example(f"{source}-{number}", question, labels, [image], source, _image_name(row["image"]))
            )
        return examples

    # ---------------------------------------------------------------- prompts
    # bound methods of a frozen instance: class attributes that the instance calls without ``self``
    _prompts = base.InstructionPrompts(cot=COT, qa=QA, select=SELECT)
    cot_prompt, qa_prompt = _prompts.cot_prompt, _prompts.qa_prompt
    answer_line, select_instruction = _prompts.answer_line, _prompts.select_instruction

    # ---------------------------------------------------------------- scoring
    def extract(self, text: str, example: Example) -> str | None:
        return extract_answer(text)

    def normalize(self, answer: str, example: Example) -> str:
        """Numbers in one canonical form (a trailing % read as a percentage under ``relaxed``), text lowercased."""
        text = answer.strip()
        value = _relaxed_float(text) if self.relaxed else _plain_float(text)
        return _canonical_number(value) if value is not None else text.lower()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        if answer is None:
            return False
        labels = example.metadata.get("labels") or [str(example.answer)]
        judge = relaxed_correct if self.relaxed else r3v_correct
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
