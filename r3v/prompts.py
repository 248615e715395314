"""The self-refine and self-select prompts, built around a task's own CoT prompt and wording."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r3v.records import Example

REFINE_INSTRUCTION = (
    "The prediction above may be wrong. Judge whether it is correct; if it is not, "
    "find the error and write a corrected step-by-step solution, then give the final answer."
)


def refine_prompt(task: Any, example: Example, wrong_rationale: str) -> str:
    """Question plus a (wrong) rationale in; the target is a correct rationale."""
    return f"{task.cot_prompt(example)}\n\nModel's prediction:\n{wrong_rationale.strip()}\n\n{REFINE_INSTRUCTION}"


def select_prompt(task: Any, example: Example, candidates: Sequence[str]) -> str:
    """Question plus numbered candidate rationales in; the target names the right answer."""
    numbered = "\n\n".join(
        f"Model's prediction {i}:\n{text.strip()}" for i, text in enumerate(candidates, start=1)
    )
    return f"{task.cot_prompt(example)}\n\n{numbered}\n\n{task.select_instruction(example)}"
