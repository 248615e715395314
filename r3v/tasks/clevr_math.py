"""``clevr-math``: CLEVR-Math counting arithmetic (Dahlgren Lindström & Abraham, 2022), scored as R3V does.

Data, from a local folder, either layout:

* R3V's: ``clevr_<split>.json``, a list of ``{"filename" (or "image"), "question", "answer"}``, with
  images in ``clevr_math_imgs/``;
* CLEVR-Math's own: ``clevr-math-<split>.json`` in the CLEVR question-file format
  ``{"questions": [{"image_filename", "question", "answer", "template_filename", "split"}, ...]}``,
  with images in ``CLEVR_v1.0/images/<split>/``. (R3V's file may hold this format too.)

or from the Hugging Face parquet mirror ``ohjoonhee/CLEVR-Math-Test`` (test only; configs ``general``
and ``multihop``; columns template, id, question, image, label). The official ``dali-does/clevr-math``
is a loading script, which ``datasets>=4`` no longer runs.

Scoring (R3V ``extract_number``; the benchmark has no official text scorer): a bare 0-10 output is
the answer; otherwise the first integer after "Answer:" (so "Answer: 3.0" reads 3); otherwise
nothing. Correct when it equals the gold integer written in decimal, character for character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
from r3v.reference import REFERENCE_A_VALUE_TARGET
from r3v.registry import tasks
from r3v.tasks import base

DEFAULT_HUB = "ohjoonhee/CLEVR-Math-Test"
INSTRUCTION = "a single numerical value (0-10)."
COT = f"First generate a step-by-step solution, then answer the question using {INSTRUCTION}"
QA = f"Answer the question using {INSTRUCTION}"
SELECT = f"Which prediction is correct? Give the final answer with {INSTRUCTION}"

_BARE = re.compile(r"[0-9]|10")
_AFTER_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_GOLD = re.compile(r"-?[0-9]+")


def extract_number(text: str) -> str | None:
    """R3V ``extract_number``; None where R3V writes "unknown"."""
    stripped = text.strip()
    if _BARE.fullmatch(stripped):
        return stripped
    match = _AFTER_ANSWER.search(text)
    return match.group(1) if match else None


def _gold(record: dict, keys: tuple[str, ...], where: base.Where) -> str:
    """The gold count as the decimal string R3V compares against: an int, or a string of digits."""
    key = base.present_key(record, keys, where)
    value = record[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and _GOLD.fullmatch(value):
        return value
    raise DataError(f"field {key!r} should be an integer, got {value!r}", **where)


@dataclass(frozen=True)
class ClevrMathOptions(base.HubOptions):
    #: Hub id or local parquet/json file, used when no data dir is given ("" for none).
    hf_dataset: str | None = DEFAULT_HUB
    #: The hub dataset's configuration (ignored for a local file).
    hf_config: str | None = "general"


@tasks.register("clevr-math")
class ClevrMath(base.InstructionPrompts, base.TaskBase):
    """CLEVR-Math counting questions from R3V's or CLEVR-Math's files or the hub mirror; exact match."""

    name = "clevr-math"
    splits = ("train", "val", "test")
    sources = (
        "local dir (R3V: clevr_<split>.json + clevr_math_imgs/; or CLEVR-Math: clevr-math-<split>.json + "
        f"CLEVR_v1.0/images/<split>/); hub: {DEFAULT_HUB} (test only; configs general, multihop)"
    )
    breakdown_keys = ("template",)
    metadata_keys = ("template",)
    Options = ClevrMathOptions
    #: Reference A trained self-select on the bare value here (not ``Answer: X``).
    reference = REFERENCE_A_VALUE_TARGET
    cot_instruction, qa_instruction, select_text = COT, QA, SELECT

    # ---------------------------------------------------------------- loading
    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        split = "val" if split == "validation" else split
        self.start_load(split)
        if data_dir is None:
            return self._load_hub(split, limit)
        root = Path(data_dir)
        r3v_file, official_file = root / f"clevr_{split}.json", root / f"clevr-math-{split}.json"
        if r3v_file.exists():
            path, image_dir = r3v_file, "clevr_math_imgs"
        elif official_file.exists():
            path, image_dir = official_file, None
        else:
            raise DataError(f"clevr-math: neither {r3v_file.name} nor {official_file.name} found under {root}",
                            path=root)
        data = base.read_json(path)
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            records = data["questions"]
        elif isinstance(data, list):
            records = data
        else:
            raise DataError('expected a JSON list of records or an object with a "questions" list', path=path)
        return self.collect(records, lambda index, record: self._build(record, index, root, split, image_dir, path),
                            limit)

    def example_from_record(self, record: dict, index: int, data_dir: str | Path | None = None) -> Example:
        """One record with ``question`` and ``answer`` (or the hub's ``label``); its image field is used
        when ``data_dir`` is given (R3V layout)."""
        root = Path(data_dir) if data_dir else None
        return self._build(record, index, root, "test", "clevr_math_imgs", None)

    def _build(
        self, record: Any, index: int, root: Path | None, split: str, image_dir: str | None, path: Path | None
    ) -> Example:
        where = {"path": path, "record": f"index {index}"}
        record = base.object_record(record, where)
        question = base.text_field(record, "question", where)
        answer = _gold(record, ("answer", "label"), where)
        template = record.get("template_filename", record.get("template"))
        images = []
        if root is not None:
            filename = base.text_field(record, ("filename", "image", "image_filename"), where)
            if image_dir is None:  # CLEVR-Math layout: images sorted by the CLEVR split they come from
                image_split = record.get("split", split)
                relative = f"CLEVR_v1.0/images/{image_split}/{filename}"
            else:
                relative = f"{image_dir}/{filename}"
            images.append(str(self.local_image(root, relative, where)))
        return self._example(index, question, answer, images, template)

    def _example(self, index: int, question: str, answer: str, images: list, template: Any) -> Example:
        return Example(id=str(index), task=self.name, question=question, answer=answer, images=images,
                       metadata={"template": _template_name(template)})

    def _load_hub(self, split: str, limit: int | None) -> list[Example]:
        name = self.options.hf_dataset
        if name == DEFAULT_HUB and split != "test":
            raise DataError(f"{DEFAULT_HUB} has only a test split; use --data-dir for {split!r}")
        kwargs: dict[str, Any] = {}
        if self.options.hf_config and name and not Path(name).exists():
            kwargs["name"] = self.options.hf_config
        data = self.hub_rows(split, "R3V or CLEVR-Math layout", **kwargs)
        missing = {"question", "label", "image"} - set(data.column_names)
        if missing:
            raise DataError(f"missing column(s) {sorted(missing)}; expected template, id, question, image, label",
                            path=name)

        def build(index: int, row: dict[str, Any]) -> Example:
            where = {"path": name, "record": f"row {index}"}
            question = base.text_field(row, "question", where)
            answer = _gold(row, ("label",), where)
            return self._example(index, question, answer, [base.hub_image(row["image"], where)], row.get("template"))

        # the limit counts rows read, bad ones included
        rows = (data[index] for index in range(len(data) if limit is None else min(limit, len(data))))
        return self.collect(rows, build, None)

    # ---------------------------------------------------------------- scoring
    def extract(self, text: str, example: Example) -> str | None:
        return extract_number(text)

    def normalize(self, answer: str, example: Example) -> str:
        # R3V compares strings exactly ("03" is not "3"), so the vote does too
        return answer.strip()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and answer == str(example.answer)


def _template_name(value: Any) -> str | None:
    # CLEVR-Math names the template by its file ("subtraction.json"); the hub copy drops ".json".
    # R3V's files have none: None keeps those questions out of the per-template breakdown.
    if isinstance(value, str) and value:
        return value[:-5] if value.endswith(".json") else value
    return None
