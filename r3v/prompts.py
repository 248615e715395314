"""The self-refine and self-select prompts, built around a task's own CoT prompt and wording.

A ``PromptLayout`` fixes the wording and separators around the task's question, CoT instruction
and select instruction. r3v has its own (``R3V_PROMPTS``, the default); the ``prompts=reference``
task option (on with ``--reference``) uses the wording of the code release the task comes from
(``task.reference``, ``r3v.reference``): ``REFERENCE_A`` (the official code: TabMWP, ChartQA,
CLEVR-Math) or ``REFERENCE_B`` (the Qwen2-VL code: GeoQA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from r3v.records import Example

if TYPE_CHECKING:  # tasks import nothing from here at run time, but their type lives there
    from r3v.tasks.base import Task

#: The two prompt wordings a task can use (``prompt_style``).
PROMPT_STYLES = ("r3v", "reference")

REFINE_INSTRUCTION = (
    "The prediction above may be wrong. Judge whether it is correct; if it is not, "
    "find the error and write a corrected step-by-step solution, then give the final answer."
)


@dataclass(frozen=True)
class PromptLayout:
    """Templates of the refine and select prompts. Fields in braces: ``question`` (the header),
    ``wrong`` (the rationale to refine), ``number`` and ``text`` (one candidate), ``candidates``
    (the candidates joined by ``candidate_separator``) and ``instruction`` (the task's select
    instruction, unless ``select_instruction`` replaces it)."""

    name: str
    #: The question block: "{cot_prompt}" (the task's CoT prompt, as sampled) or a template over
    #: "{body}" (the question with its options, for tasks that have ``body``).
    question: str
    refine: str
    candidate: str
    candidate_separator: str
    select: str
    #: A fixed select instruction (the release used one for all questions); None: the task's own.
    select_instruction: str | None = None


R3V_PROMPTS = PromptLayout(
    name="r3v",
    question="{cot_prompt}",
    refine="{question}\n\nModel's prediction:\n{wrong}\n\n" + REFINE_INSTRUCTION,
    candidate="Model's prediction {number}:\n{text}",
    candidate_separator="\n\n",
    select="{question}\n\n{candidates}\n\n{instruction}",
)

#: The official code (Qwen-VL-Chat and LLaVA-1.5 on TabMWP, ChartQA, CLEVR-Math): r3v's parts, with
#: single newlines and its own refine instruction.
REFERENCE_A = replace(
    R3V_PROMPTS, name="reference-a", candidate_separator="\n", select="{question}\n{candidates}\n{instruction}",
    refine="{question}\nModel's prediction:\n{wrong}\nJudge the correctness of the model's prediction and refine it.",
)

#: The Qwen2-VL code (GeoQA): its refine and select items open with the question and a short CoT
#: line rather than the sampling prompt, and it writes "Predicion" (sic) in the refine prompt.
REFERENCE_B = replace(
    REFERENCE_A, name="reference-b", question="{body}\nAnswer the question with Chain-of-Thought.",
    refine="{question}\nModel's Predicion: {wrong}\nJudge the correctness of the model's prediction and refine it.",
    candidate="Model's Prediction {number}: {text}",
    select_instruction="Which prediction is correct? Give the final answer for the beginning question by "
    "selecting the correct option.",
)


#: Every layout by name (``Release.prompts`` names one).
LAYOUTS = {layout.name: layout for layout in (R3V_PROMPTS, REFERENCE_A, REFERENCE_B)}


def prompt_layout(task: Task) -> PromptLayout:
    """The layout a task's ``prompt_style`` asks for: r3v's, or its reference release's."""
    if task.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {task.prompt_style!r}")
    return R3V_PROMPTS if task.prompt_style == "r3v" else LAYOUTS[task.reference.prompts]


def _question(layout: PromptLayout, task: Task, example: Example) -> str:
    if "{body}" in layout.question:
        return layout.question.format(body=task.body(example) if task.body is not None else example.question)
    return layout.question.format(cot_prompt=task.cot_prompt(example))


def refine_prompt(task: Task, example: Example, wrong_rationale: str, layout: PromptLayout | None = None) -> str:
    """Question plus a (wrong) rationale in; the target is a correct rationale."""
    layout = layout or prompt_layout(task)
    return layout.refine.format(question=_question(layout, task, example), wrong=wrong_rationale.strip())


def select_prompt(
    task: Task, example: Example, candidates: Sequence[str], layout: PromptLayout | None = None
) -> str:
    """Question plus numbered candidate rationales in; the target names the right answer."""
    layout = layout or prompt_layout(task)
    numbered = layout.candidate_separator.join(
        layout.candidate.format(number=i, text=text.strip()) for i, text in enumerate(candidates, start=1)
    )
    instruction = layout.select_instruction or task.select_instruction(example)
    return layout.select.format(question=_question(layout, task, example), candidates=numbered, instruction=instruction)
