"""The sample store: an append-only JSONL file of scored samples, resumable and shardable.

Work is cut into fixed chunks of examples, in example order. Each chunk is generated with a seed
derived from (seed, chunk index) and appended in one write, so a rerun after a kill regenerates
exactly the missing chunks and ends with the same file an uninterrupted run writes. A run manifest
(versions, model, adapter, sampling, seeds) sits beside the file; a rerun with other settings is
refused instead of mixing samples from two configurations.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3v.backends.base import Backend, generate_groups
from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl_tail
from r3v.manifest import run_manifest
from r3v.records import Completion, Example, Request, Sample, Sampling
from r3v.seeds import stride_seed

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if not text:
            return cls(0, 1)
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"--shard must look like i/k with 0 <= i < k, got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def select(self, items: Sequence[Any]) -> list[Any]:
        return [item for position, item in enumerate(items) if position % self.count == self.index]

    def suffix(self) -> str:
        return "" if self.count == 1 else f".shard{self.index}of{self.count}"


def manifest_path(samples_path: str | Path) -> Path:
    path = Path(samples_path)
    return path.with_name(path.name + ".manifest.json")


class SampleStore:
    """Scored samples in ``path``; ``settings`` identify what produced them."""

    def __init__(self, path: str | Path, settings: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.settings = settings
        self.repaired_bytes = 0
        if settings is not None:
            self._check_manifest(settings)

    def _check_manifest(self, settings: dict[str, Any]) -> None:
        mpath = manifest_path(self.path)
        if mpath.exists():
            previous = json.loads(mpath.read_text()).get("settings")
            if previous != json.loads(json.dumps(settings)):
                raise DataError(
                    "the sample store was written with other settings; use another output path or delete it. "
                    f"stored: {previous}; now: {settings}",
                    path=self.path,
                )
        elif self.path.exists() and self.path.stat().st_size > 0:
            raise DataError("samples exist without a manifest; refusing to trust them", path=self.path)
        else:
            atomic_write_json(mpath, run_manifest(settings))

    def samples(self) -> list[Sample]:
        if not self.path.exists():
            return []
        self.repaired_bytes += repair_jsonl_tail(self.path)
        out = []
        for line, record in iter_jsonl(self.path):
            try:
                out.append(Sample.from_dict(record))
            except (DataError, TypeError) as exc:
                raise DataError(f"malformed sample: {exc}", path=self.path, record=f"line {line}") from exc
        return out

    def done(self) -> set[tuple[str, int]]:
        return {(s.example_id, s.sample_index) for s in self.samples()}

    def append(self, samples: Iterable[Sample]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, [s.to_dict() for s in samples])


def sample_examples(
    backend: Backend,
    task: Task,
    examples: Sequence[Example],
    sampling: Sampling,
    store: SampleStore,
    prompt: Callable[[Example], str] | None = None,
    chunk_size: int = 32,
    iteration: int | None = None,
    on_chunk: Callable[[int, int, list[Sample]], None] | None = None,
    skip_bad: bool = False,
    bad: list[str] | None = None,
    engine_batch: int | None = None,
) -> list[Sample]:
    """Sample ``sampling.n`` completions per example into ``store``; return all stored samples.

    Only chunks with missing samples are generated. Each chunk (``chunk_size`` questions) has its
    own seed and is appended in one write: it is the unit of resume. Up to ``engine_batch``
    questions' worth of chunks (default: the backend's ``preferred_engine_batch``, else one chunk)
    go to the backend in one call (``generate_groups``), so an engine such as vLLM gets hundreds of
    prompts at once; a kill loses at most that one call's chunks.
    ``on_chunk(done_examples, total, new)`` reports progress after each chunk. An example whose
    images cannot be read raises a DataError naming the file and the record; with ``skip_bad`` it
    is skipped instead and its error appended to ``bad``.
    """
    prompt = prompt or task.cot_prompt
    done = store.done()
    chunks = [examples[i : i + chunk_size] for i in range(0, len(examples), chunk_size)]
    # a backend that serves large batches well (vLLM) says how many questions it wants per call
    per_call = max(engine_batch or getattr(backend, "preferred_engine_batch", None) or chunk_size, 1)
    finished = 0
    pending: list[tuple[int, list[Example], list[Request], Sampling]] = []  # chunks waiting for one call

    def flush() -> None:
        nonlocal finished
        started = time.perf_counter()
        outputs = generate_groups(backend, [(requests, chunk_sampling) for _, _, requests, chunk_sampling in pending])
        # the engine serves the whole call at once: each completion gets an even share of its time
        made = sum(len(completions) for chunk_outputs in outputs for completions in chunk_outputs)
        share = (time.perf_counter() - started) / max(made, 1)
        for (chunk_index, readable, _, chunk_sampling), chunk_outputs in zip(pending, outputs, strict=True):
            chunk = chunks[chunk_index]
            by_id = {ex.id: completions for ex, completions in zip(readable, chunk_outputs, strict=True)}
            new = [
                score_completion(task, ex, k, by_id[ex.id][k], backend.model_id, chunk_sampling, iteration, share)
                for ex in chunk for k in range(sampling.n) if (ex.id, k) not in done and ex.id in by_id
            ]
            store.append(new)
            finished += len(chunk)
            if on_chunk:
                on_chunk(finished, len(examples), new)
        pending.clear()

    for chunk_index, chunk in enumerate(chunks):
        if all((ex.id, k) in done for ex in chunk for k in range(sampling.n)):
            finished += len(chunk)
            if on_chunk:
                on_chunk(finished, len(examples), [])
            continue
        readable, requests = [], []
        for ex in chunk:
            try:
                requests.append(Request.user(prompt(ex), ex.load_images()))
                readable.append(ex)
            except DataError as exc:
                if not skip_bad:
                    raise
                if bad is not None:
                    bad.append(str(exc))
        chunk_sampling = Sampling(**{**sampling.to_dict(), "seed": stride_seed(sampling.seed, chunk_index)})
        pending.append((chunk_index, readable, requests, chunk_sampling))
        if sum(len(p[2]) for p in pending) >= per_call:
            flush()
    if pending:
        flush()
    return store.samples()


def score_completion(task: Task, example: Example, index: int, completion: Completion, model_id: str,
                     sampling: Sampling, iteration: int | None, seconds: float = 0.0) -> Sample:
    """A stored Sample from one completion: the task's extracted answer and verdict, with its cost."""
    answer = task.extract(completion.text, example)
    return Sample(
        example_id=example.id,
        sample_index=index,
        text=completion.text,
        answer=answer,
        correct=bool(task.is_correct(answer, example)),
        model=model_id,
        sampling={k: v for k, v in sampling.to_dict().items() if k != "seed"},
        seed=sampling.seed,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
        iteration=iteration,
        seconds=round(seconds, 6),
    )


def merge_shards(shard_paths: Sequence[str | Path], out: str | Path) -> int:
    """Merge shard stores into one file, ordered by example id then sample index; duplicates dropped."""
    seen: dict[tuple[str, int], dict] = {}
    for path in shard_paths:
        repair_jsonl_tail(path)
        for _, record in iter_jsonl(path):
            seen.setdefault((record["example_id"], record["sample_index"]), record)
    ordered = sorted(seen.values(), key=lambda r: (_natural_key(r["example_id"]), r["sample_index"]))
    from r3v.io import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    first_manifest = manifest_path(shard_paths[0])
    if first_manifest.exists():
        manifest = json.loads(first_manifest.read_text())
        manifest["merged_from"] = [str(p) for p in shard_paths]
        atomic_write_json(manifest_path(out), manifest)
    return len(ordered)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
