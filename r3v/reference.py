"""The two reference code releases of R3V, and the settings that make r3v behave as they did.

r3v differs from the reference code on purpose in a few places (docs/reference.md lists each, with
its switch). A ``Release`` records what one release did; each task names the release it comes from
(``Task.reference``), and ``reference_settings`` turns that into the config values that undo every
difference at once (``--reference``):

- selection: always call the model, and score an unreadable select output as wrong;
- scoring: the task's official scorer, with seeded draws where the reference draws at random;
- prompts: the release's self-refine and self-select wording (``r3v.prompts``);
- loss: reference A averaged each micro-batch's tokens (``TrainConfig.loss_mean``);
- self-select target: the bare value where the release trained on it;
- rationale filter: reference B drops samples that are no rationale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Release:
    """What one reference code release did, where r3v's default does otherwise."""

    name: str
    #: The repository, for the records.
    code: str
    #: ``r3v.prompts`` layout name of its self-refine and self-select prompts.
    prompts: str
    #: ``TrainConfig.loss_mean`` of its trainer.
    loss_mean: str
    #: ``BuildConfig.select_target``: "answer" (``Answer: X``) or "value" (the bare value).
    select_target: str = "answer"
    #: ``BuildConfig.rationale_min_chars`` and ``drop_answer_first``: its filter of non-rationales.
    rationale_min_chars: int = 0
    drop_answer_first: bool = False


#: The official release: Qwen-VL-Chat and LLaVA-1.5 on TabMWP, ChartQA and CLEVR-Math, trained
#: with the transformers Trainer and gradient accumulation (a token mean per micro-batch).
REFERENCE_A = Release(
    name="A", code="njucckevin/MM-Self-Improve", prompts="reference-a", loss_mean="micro_batch",
)
#: The Qwen2-VL release: Qwen2-VL-7B on GeoQA, trained with LLaMA-Factory (a token mean over the
#: step, as r3v's default), dropping samples of 50 characters or fewer or opening with "Answer".
REFERENCE_B = Release(
    name="B", code="hhhwmws0117/MM-self-improve-qwen2vl", prompts="reference-b", loss_mean="global",
    rationale_min_chars=50, drop_answer_first=True,
)
#: Reference A on ChartQA and CLEVR-Math trained self-select to output the bare value.
REFERENCE_A_VALUE_TARGET = replace(REFERENCE_A, select_target="value")

#: The task options that ``--reference`` sets (every task takes them, ``r3v.tasks.base.TaskOptions``).
REFERENCE_TASK_ARGS = {"prompts": "reference", "scoring": "official"}
#: The self-select settings (``r3v.config.SelectConfig``) that ``--reference`` sets.
REFERENCE_SELECT = {"skip_when_agree": False, "unparseable": "wrong"}


def reference_settings(release: Release) -> dict[str, Any]:
    """The ``r3v train`` config values (``r3v.config.LoopConfig`` shape) that behave as ``release``."""
    return {
        "task": {"args": dict(REFERENCE_TASK_ARGS)},
        "eval": {"select": dict(REFERENCE_SELECT)},
        "train": {"loss_mean": release.loss_mean},
        "build": {
            "select_target": release.select_target,
            "rationale_min_chars": release.rationale_min_chars,
            "drop_answer_first": release.drop_answer_first,
        },
    }
