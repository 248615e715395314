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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import (
    ChoiceTask,
    HubOptions,
    InstructionPrompts,
    Where,
    choice_fallbacks,
    first_existing,
    format_options,
    hub_image,
    option_letter,
    read_records,
    record_label,
    text_field,
)

HF_DATASET = "LightChen2333/M3CoT"

_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")


def official_judge_letter(text: str, choices: Sequence[str]) -> str | None:
    """The letter M3CoT's ``judge_answer`` reads from ``text``; None where it gives up ("FAILED")."""
    if "[Answer]" in text:
        text = text.split("[Answer]")[-1].split("[Rationale]")[0].split("[Context]")[0]
    found = _PAREN_LETTER.findall(text)
    if found:
        return found[-1].upper()
    return choice_fallbacks(text, choices)


# --- the task --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class M3CoTOptions(HubOptions):
    hf_dataset: str | None = HF_DATASET


@tasks.register("m3cot")
class M3CoT(InstructionPrompts, ChoiceTask):
    """M3CoT multiple choice (science, commonsense, mathematics) with the official judge."""

    name = "m3cot"
    splits = ("train", "validation", "test")
    sources = f"hub: {HF_DATASET}; local dir: <split>.jsonl or <split>.parquet / data/<split>-*.parquet"
    breakdown_keys = ("domain", "topic")
    metadata_keys = ("context", "domain", "topic", "category", "image_id", "rationale")
    Options = M3CoTOptions
    question_optional = True
    # M3CoT's experiment files put a blank line before the instruction
    cot_instruction = (
        "\nLet's think step-by-step! "
        'Then give the final answer on the last line as "Answer: (X)", where X is the letter of the correct option.'
    )
    qa_instruction = "\nAnswer with the option's letter from the given choices directly."
    select_text = 'Which prediction is correct? Give the final answer as "Answer: (X)" with the letter of the correct option.'

    # loading ------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.start_load(split)
        if data_dir is None:
            rows = self.hub_rows(split, "<split>.jsonl or parquet files")
            return self._examples(rows, self.options.hf_dataset, None, limit)
        root = Path(data_dir)
        jsonl = first_existing(root, [f"{split}.jsonl", f"{split}.json"])
        if jsonl:
            return self._examples(read_records(jsonl[0]), jsonl[0], root, limit)
        parquet = first_existing(root, [f"{split}.parquet", f"data/{split}-*.parquet"])
        if parquet:
            # one file loads as is; hub-style shards load through the folder, as the hub lays them out
            source = parquet[0] if len(parquet) == 1 else root
            rows = self.hub_rows(split, "", dataset=str(source))
            return self._examples(rows, source, None, limit)
        raise DataError(
            f"m3cot: no {split}.jsonl, {split}.parquet or data/{split}-*.parquet under {root}", path=root
        )

    def _examples(self, rows: Any, source: Any, images_root: Path | None, limit: int | None) -> list[Example]:
        def build(index: int, record: Any) -> Example:
            where = {"path": source, "record": record_label(record, index)}
            example = self.read_record(record, where)
            cell = record.get("image")
            if images_root is None:
                example.images = [hub_image(cell, where)]
            elif not isinstance(cell, str) or not cell:
                raise DataError("field 'image' should be an image path relative to the data folder", **where)
            else:
                example.images = [str(self.local_image(images_root, cell, where))]
            return example

        return self.collect(rows, build, limit)

    def read_record(self, record: Any, where: Where) -> Example:
        """Needs ``id``, ``choices``, ``answer``; reads ``question``, ``context``, ``domain``, ``topic``,
        ``category``, ``image_id`` and ``rationale`` when present (images are not needed to score)."""
        example = super().read_record(record, where)
        # context is always there (the prompt reads it), and first; the other keys only when given
        context = text_field(record, "context", where, optional=True) or ""
        example.metadata = {"context": context, **example.metadata}
        return example

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

    def answer_line(self, answer: Any, example: Example) -> str:
        """The letter in parentheses, which the official judge reads before anything else."""
        return f"Answer: ({option_letter(answer)})"

    # scoring ------------------------------------------------------------------------------------

    def read_letter(self, text: str, choices: Sequence[str]) -> str | None:
        return official_judge_letter(text, choices)
