"""Warm-up distillation: a stronger teacher writes chain-of-thought rationales for train questions.

R3V's iteration 0 trains on rationales from a teacher (the paper used GPT-4o). Each question is
asked with the task's CoT prompt; a rationale is kept only when the task's own extraction and
scoring find the right answer in it, and the teacher did not stop at the token limit (a cut-off
rationale would teach the student to stop mid-thought). Questions still unsolved are asked
again, up to ``tries`` rounds.

Every round writes through a sample store under ``<out>.tries/``, so a rerun after an
interruption resumes where the stores end and sends no request twice for stored work. The
warm-up file is written atomically at the end, with a run manifest beside it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3v.backends.base import Backend
from r3v.io import atomic_write_json
from r3v.manifest import run_manifest
from r3v.records import Example, Sample, Sampling, write_jsonl
from r3v.seeds import stride_seed
from r3v.store import SampleStore, manifest_path, sample_examples

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

ANSWER_HINT = 'End your response with a final line of the form "{line}".'


@dataclass
class DistillConfig:
    """What to ask the teacher, and how often."""

    teacher: str
    """Model name as the backend knows it (API model name, hub id or folder)."""
    task: str
    """Task name (see ``r3v list``)."""
    backend: str = "openai"
    """Backend name, recorded in the manifests."""
    split: str = "train"
    limit: int | None = 1000
    """Ask only the first K questions of the split (the paper used 800 to 1,000)."""
    data_dir: str | None = None
    tries: int = 3
    """Sampling rounds; each round asks only the questions still unsolved."""
    n: int = 1
    """Rationales asked per question per round."""
    keep_per_question: int = 1
    """Distinct correct rationales kept per question; a question is solved once it has this many."""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 1024
    seed: int = 0
    chunk_size: int = 32
    """Questions per generate call, and per resume unit of a round's sample store."""
    answer_hint: bool = False
    """Append an instruction to end with the task's answer line (the training prompt stays plain)."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """The task options given (``--task-arg``), as the task typed them: they can change the questions
    and their scoring, so they are recorded and part of a round's identity."""

    def __post_init__(self) -> None:
        for name in ("tries", "n", "keep_per_question", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def sampling(self, try_index: int) -> Sampling:
        """Sampling for round ``try_index`` (0-based): its own seed, so a retry is a fresh draw."""
        return Sampling(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=stride_seed(self.seed, try_index, stride=1_000),
            greedy=self.temperature == 0,
        )


@dataclass
class TryReport:
    try_number: int  # 1-based
    asked: int  # questions asked in this round
    solved: int  # of those, questions that reached keep_per_question
    samples: int
    correct: int
    prompt_tokens: int  # counted once per question asked
    completion_tokens: int


@dataclass
class DistillReport:
    teacher: str
    task: str
    split: str
    out: str
    questions: int
    kept_questions: int  # questions with at least one kept rationale
    rationales: int  # lines written
    tries: list[TryReport] = field(default_factory=list)
    prompt_tokens: int = 0  # over every round's stored samples
    completion_tokens: int = 0
    cost_usd: float | None = None
    this_run: dict[str, int] | None = None  # the backend's own usage for this invocation, if it counts
    this_run_cost_usd: float | None = None

    @property
    def yield_rate(self) -> float:
        return self.kept_questions / self.questions if self.questions else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "yield": self.yield_rate}


@dataclass(frozen=True)
class Prices:
    """USD per million tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1_000_000


def work_dir(out: str | Path) -> Path:
    """Where the per-round sample stores of ``out`` live."""
    out = Path(out)
    return out.with_name(out.name + ".tries")


def teacher_prompt(task: Task, example: Example, answer_hint: bool) -> str:
    prompt = task.cot_prompt(example)
    if answer_hint:
        prompt += "\n" + ANSWER_HINT.format(line=task.answer_line("<answer>", example))
    return prompt


def warmup_record(task: Task, example: Example, rationale: str, teacher: str) -> dict[str, Any]:
    """One line of the warm-up file, the shape ``r3v train --warmup-file`` reads."""
    return {
        "example_id": example.id,
        "task": task.name,
        "prompt": task.cot_prompt(example),
        "target": rationale,
        "teacher": teacher,
    }


def distill(
    backend: Backend,
    task: Task,
    examples: Sequence[Example],
    config: DistillConfig,
    out: str | Path,
    prices: Prices | None = None,
    on_chunk: Callable[[int, int, int, list[Sample]], None] | None = None,
) -> DistillReport:
    """Ask the teacher, keep the correct rationales, write ``out``; return the report.

    ``on_chunk(try_number, done, total, new_samples)`` reports progress within each round.
    """
    out = Path(out)
    order = {ex.id: position for position, ex in enumerate(examples)}
    if len(order) != len(examples):
        raise ValueError("example ids must be unique")
    kept: dict[str, list[str]] = {ex.id: [] for ex in examples}
    report = DistillReport(config.teacher, config.task, config.split, str(out), len(examples), 0, 0)
    for try_index in range(config.tries):
        pending = [ex for ex in examples if len(kept[ex.id]) < config.keep_per_question]
        if not pending:
            break
        sampling = config.sampling(try_index)
        store = SampleStore(
            work_dir(out) / f"try{try_index + 1}.jsonl", _try_settings(config, try_index, pending)
        )
        progress = functools.partial(on_chunk, try_index + 1) if on_chunk is not None else None
        samples = sample_examples(
            backend,
            task,
            pending,
            sampling,
            store,
            prompt=lambda ex: teacher_prompt(task, ex, config.answer_hint),
            chunk_size=config.chunk_size,
            on_chunk=progress,
        )
        pending_ids = {ex.id for ex in pending}
        samples = sorted(
            (s for s in samples if s.example_id in pending_ids),
            key=lambda s: (order[s.example_id], s.sample_index),
        )
        for sample in samples:
            rationale = sample.text.strip()
            bucket = kept[sample.example_id]
            if is_keepable(sample) and rationale not in bucket and len(bucket) < config.keep_per_question:
                bucket.append(rationale)
        report.tries.append(_try_report(try_index, pending, samples, kept, config.keep_per_question))

    by_id = {ex.id: ex for ex in examples}
    records = [warmup_record(task, by_id[i], r, config.teacher) for i in kept for r in kept[i]]
    write_jsonl(out, records)
    report.kept_questions = sum(1 for rationales in kept.values() if rationales)
    report.rationales = len(records)
    report.prompt_tokens = sum(t.prompt_tokens for t in report.tries)
    report.completion_tokens = sum(t.completion_tokens for t in report.tries)
    usage = getattr(backend, "usage", None)
    if usage is not None and hasattr(usage, "to_dict"):
        report.this_run = usage.to_dict()
    if prices is not None:
        report.cost_usd = prices.cost(report.prompt_tokens, report.completion_tokens)
        if report.this_run is not None:
            report.this_run_cost_usd = prices.cost(
                report.this_run["prompt_tokens"], report.this_run["completion_tokens"]
            )
    manifest = run_manifest(_base_settings(config))
    manifest["report"] = report.to_dict()
    atomic_write_json(manifest_path(out), manifest)
    return report


def is_keepable(sample: Sample) -> bool:
    """Correct, and finished on its own rather than at the token limit."""
    return sample.correct and sample.finish_reason != "length" and bool(sample.text.strip())


def _try_report(
    try_index: int,
    pending: Sequence[Example],
    samples: Sequence[Sample],
    kept: dict[str, list[str]],
    keep: int,
) -> TryReport:
    first_of_question: dict[str, Sample] = {}
    for sample in samples:
        first_of_question.setdefault(sample.example_id, sample)
    return TryReport(
        try_number=try_index + 1,
        asked=len(pending),
        solved=sum(1 for ex in pending if len(kept[ex.id]) >= keep),
        samples=len(samples),
        correct=sum(1 for s in samples if s.correct),
        prompt_tokens=sum(s.prompt_tokens for s in first_of_question.values()),
        completion_tokens=sum(s.completion_tokens for s in samples),
    )


def _base_settings(config: DistillConfig) -> dict[str, Any]:
    return {"kind": "distill", **asdict(config)}


def _try_settings(config: DistillConfig, try_index: int, pending: Sequence[Example]) -> dict[str, Any]:
    """What a round's store content depends on. ``tries`` and ``keep_per_question`` are left out,
    so a rerun with more tries extends the work. The question ids are hashed in, so a store that
    another set of questions wrote (say, after an earlier round's store was deleted) is refused
    rather than mixed."""
    ids = "\n".join(ex.id for ex in pending)
    return {
        "kind": "distill",
        "teacher": config.teacher,
        "backend": config.backend,
        "task": config.task,
        "split": config.split,
        "data_dir": config.data_dir,
        "answer_hint": config.answer_hint,
        **({"task_args": config.task_args} if config.task_args else {}),  # absent: stores of older runs match
        "chunk_size": config.chunk_size,
        "try": try_index + 1,
        "sampling": config.sampling(try_index).to_dict(),
        "questions": len(pending),
        "questions_sha256": hashlib.sha256(ids.encode()).hexdigest(),
    }
