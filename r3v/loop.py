"""The R3V self-training loop behind ``r3v train --iterations N``, as phase functions.

Iteration 0 is the warm-up: train on direct-answer QA for the whole train split plus distilled
CoT. Each later iteration k (1..N) runs, top to bottom:

1. ``sample_train_split``: iteration k-1's model samples every train question ``sampling.n``
   times; earlier iterations' samples are kept, never regenerated;
2. ``gather_pool`` and ``build_items``: the mixture (warm-up items + self-CoT / self-refine /
   self-select) from the pool of all iterations' samples (``r3v.builders``);
3. ``train_model``: a training job, from the base model (R3V's default) or, with
   ``from_base=False``, from iteration k-1's weights, run inline, in a process of its own or
   elsewhere (``r3v.train.job``);
4. ``evaluate``: Test@1 (greedy) and, from iteration 1 on, self-select over ``eval.samples``
   sampled candidates (with majority vote and pass@N beside it);
5. ``record``: one line in metrics.jsonl (and the trackers).

Every phase leaves a completion mark, so a rerun of the same command after a kill continues where
it stopped and ends with the same files as an uninterrupted run:

    RUN_DIR/
      run.json              settings + versions; a rerun with other settings is refused
      metrics.jsonl         one line per finished iteration (appended once)
      timing.json           seconds per phase, per iteration and in total
      resources.json        per iteration and phase: seconds, tokens, peak memory
      iter0/                the warm-up
        train_items.jsonl   the shuffled training mixture
        build.json          items per kind, pool statistics, over-long items (marks the build done)
        train_job.yaml      the training step, runnable by hand (python -m r3v.train --job ...)
        model/              trainer output (LoRA adapter or full model, r3v_train_done.json)
        model.json          which model this iteration produced, and the training summary
        eval/greedy.jsonl   Test@1 samples (+ manifest); eval/results.json marks evaluation done
        timing.json
      iter1/
        samples.jsonl       train-split samples by iteration 0's model (+ .manifest.json)
        ...                 as iter0, plus eval/samples.jsonl (the self-select candidates)

A sample's ``iteration`` field is the iteration that drew it (iteration k's samples come from
iteration k-1's model); the builders order the pool by it, never by file dates.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3v.builders import build_mixture, warmup_mixture
from r3v.config import LoopConfig, TaskConfig, TrainConfig, config_file, from_mapping, merge, to_mapping
from r3v.diagnostics import pool_summary
from r3v.errors import DataError
from r3v.io import atomic_write_json
from r3v.meter import return_freed_memory
from r3v.metrics import summarize_samples
from r3v.records import OBJECTIVE_OF_KIND, Example, Sample, Sampling, TrainItem, read_jsonl, write_jsonl
from r3v.reference import REFERENCE_A, reference_settings
from r3v.registry import tasks
from r3v.rundir import (
    append_metrics,
    check_run_dir,
    iter_dir,
    measured_phase,
    metrics_row,
    metrics_rows,
    timing,
    write_timing_summary,
)
from r3v.seeds import derive_seed
from r3v.selectors.base import ALL, FIRST, MAJORITY, ORACLE, SELF_SELECT
from r3v.store import SampleStore, sample_examples

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task

#: Trackers' folder in the run directory (``--report-to``): the loop's metrics and each training step.
TRACKING_DIR = "tracking"

Progress = Callable[[str, int, int], None]


def _quiet(*_: Any) -> None:
    return None


# ---------------------------------------------------------------- the run's configuration

def resolve_config(*layers: dict[str, Any]) -> LoopConfig:
    """The run's config: the defaults, then what the base model's folder recommends (``r3v.json``,
    see ``r3v.models.presets``), then with ``reference`` the settings of the task's reference
    release (``r3v.reference``), then each layer in order (a config file, then the command line)."""
    from r3v.models.presets import model_settings

    given = merge(*layers)
    recommended = model_settings(given.get("model", LoopConfig.model))
    resolved = merge(recommended, given)
    if resolved.get("reference"):
        task = resolved.get("task", {}).get("name", TaskConfig.name)
        release = getattr(tasks.get(task), "reference", REFERENCE_A)  # a plug-in may name none
        resolved = merge(recommended, reference_settings(release), given)
    return from_mapping(LoopConfig, resolved)


def run_settings(config: LoopConfig, train_config: TrainConfig) -> dict[str, Any]:
    """What must match for a rerun to continue a run (``iterations`` may grow): run.json's settings."""
    return {
        "model": config.model,
        "task": config.task.name,
        "task_args": config.task.args,
        "skip_bad": config.task.skip_bad,
        "allow_outside_paths": config.task.allow_outside_paths,
        "build": config.build.to_dict(),
        "train": json.loads(json.dumps(asdict(train_config), default=str)),
        "from_base": config.from_base,
        "train_limit": config.task.train_limit,
        "test_limit": config.task.test_limit,
        "data_dir": str(Path(config.task.data_dir).resolve()) if config.task.data_dir else None,
        "warmup_file": _file_identity(config.warmup.file),
        "image_root": str(Path(config.warmup.image_root).resolve()) if config.warmup.image_root else None,
        "teacher_count": config.warmup.teacher_count if config.warmup.file is None else None,
        "skip_warmup_train": config.warmup.skip_training,
        "sampling": {k: v for k, v in config.sampling.to_dict().items() if k != "seed"},
        "eval_samples": config.eval.samples,
        "eval_max_new_tokens": config.eval_tokens,
        "eval_select": to_mapping(config.eval.select),
        "chunk_size": config.backend.chunk_size,
        "seed": config.seed,
        "backend": config.backend.name,
        "reference": config.reference,
    }


def execution_settings(config: LoopConfig) -> dict[str, Any]:
    """How a run executes (engine options, training processes): recorded, not part of its identity."""
    return {"backend": config.backend.name, "backend_options": dict(config.backend.options),
            "engine_batch": config.backend.engine_batch, "chunk_size": config.backend.chunk_size,
            "training_process": config.launch.process, "num_processes": config.launch.num_processes,
            "accelerate_config": config.launch.accelerate_config}


def _file_identity(path: str | None) -> dict[str, str] | None:
    """A file by content: editing the warm-up file changes the run, moving it does not."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise DataError(f"warm-up file not found: {file}", path=file)
    return {"name": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


# ---------------------------------------------------------------- what the phases share

@dataclass
class ModelRef:
    """The model an iteration produced: a base model, or a folder in the run (full or adapter)."""

    model: str
    adapter: str | None = None
    #: ``model`` is a folder relative to the run directory (a fully fine-tuned iteration).
    model_in_run: bool = False

    def model_path(self, run_dir: Path) -> str:
        return str(run_dir / self.model) if self.model_in_run else self.model

    def adapter_path(self, run_dir: Path) -> str | None:
        return str(run_dir / self.adapter) if self.adapter else None

    def label(self) -> str:
        return f"{self.model} + {self.adapter}" if self.adapter else self.model


class TimedTask:
    """A task whose answer scoring is timed, so sampling and scoring report separate seconds."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def extract(self, text: str, example: Example) -> str | None:
        started = time.perf_counter()
        try:
            return self._task.extract(text, example)
        finally:
            self.seconds += time.perf_counter() - started

    def is_correct(self, answer: str | None, example: Example) -> bool:
        started = time.perf_counter()
        try:
            return self._task.is_correct(answer, example)
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class Run:
    """One run directory and what its phases share: the config, the task's questions, the warm-up
    items, and the one generation model loaded at a time."""

    config: LoopConfig
    dir: Path
    task: Task
    train_config: TrainConfig
    train_examples: list[Example]
    test_examples: list[Example]
    warmup: list[TrainItem]
    settings: dict[str, Any]
    log: Callable[[str], None] = print
    progress: Progress = _quiet
    backend: Any = None
    backend_ref: ModelRef | None = None
    processors: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_by_id(self) -> dict[str, Example]:
        return {ex.id: ex for ex in self.train_examples}

    def phase(self, k: int, name: str):
        return measured_phase(self.dir, k, name)


def open_run(config: LoopConfig, out_dir: str | Path, log: Callable[[str], None] = print,
             progress: Progress = _quiet, task: Task | None = None) -> Run:
    """Load the task and the warm-up data, then claim (or reopen) the run directory.

    ``task`` may be passed already built (from ``config.task``); else it is built here.
    """
    from r3v.models.presets import named_preset  # transformers loads only when a loop runs
    from r3v.tasks.base import build_task, given_options
    from r3v.warmup import distill_items

    spec = config.task
    task = task or build_task(spec.name, spec.args, skip_bad=spec.skip_bad, allow_outside_paths=spec.allow_outside_paths)
    # recorded as the task typed them: a YAML 1000 and a --task-arg "1000" are the same run
    config = replace(config, task=replace(spec, args=given_options(task, spec.args)))
    spec = config.task
    train_config = config.train_config(named_preset(config.train_preset, config.model))
    train_examples = task.load("train", data_dir=spec.data_dir, limit=spec.train_limit)
    test_examples = task.load("test", data_dir=spec.data_dir, limit=spec.test_limit)
    if not train_examples or not test_examples:
        raise DataError(f"task {spec.name!r} gave no train or no test questions")
    distill = distill_items(task, train_examples, config.warmup.file, config.warmup.image_root,
                            config.warmup.teacher_count, spec.allow_outside_paths)
    if config.warmup.skip_training is None:
        config = replace(config, warmup=replace(config.warmup, skip_training=not distill))
    settings = run_settings(config, train_config)
    run_dir = Path(out_dir)
    # only once the inputs parsed: a bad warm-up file must not pin a new run directory
    check_run_dir(run_dir, settings, execution_settings(config), defaults=run_settings(LoopConfig(), TrainConfig()))
    if not distill and config.warmup.skip_training:
        log(f"no distilled CoT for {spec.name!r}: iteration 0 is the base model, and the QA items join "
            "later mixtures. Pass --warmup-file (see r3v distill) to warm up on worked solutions.")
    elif not distill:
        log(f"warning: no distilled CoT for {spec.name!r}, so the warm-up is QA only. "
            "Pass --warmup-file (see r3v distill) to give the model worked solutions to start from.")
    return Run(config, run_dir, task, train_config, train_examples, test_examples,
               warmup_mixture(task, train_examples, distill), settings, log, progress)


# ---------------------------------------------------------------- the loop

def run_loop(config: LoopConfig, out_dir: str | Path, log: Callable[[str], None] = print,
             progress: Progress = _quiet, task: Task | None = None) -> list[dict[str, Any]]:
    """Run (or resume) ``config`` in ``out_dir``: iterations 0..N, finished ones skipped.
    Returns one metrics row per iteration."""
    from r3v.tracking import LoopTracker

    run = open_run(config, out_dir, log, progress, task)
    tracker = None
    try:
        for k in range(config.iterations + 1):
            if metrics_row(run.dir, k) is not None:
                log(f"iteration {k}: already finished")
                continue
            row = iteration(run, k)
            if run.train_config.report_to:
                tracker = tracker or LoopTracker(run.train_config.report_to, run.dir / TRACKING_DIR, run.dir.name,
                                                 run.settings, log=log)
                tracker.log_iteration(row)
    finally:
        release_backend(run)
        write_timing_summary(run.dir)
        if tracker is not None:
            tracker.finish()
    return metrics_rows(run.dir)


def iteration(run: Run, k: int) -> dict[str, Any]:
    """Iteration k, phase by phase; returns its metrics row (also appended to metrics.jsonl)."""
    run.log(f"iteration {k}" + (" (warm-up)" if k == 0 else ""))
    new_samples = sample_train_split(run, k) if k > 0 else []
    pool = gather_pool(run, k)
    build = build_items(run, k, pool)
    ref, trained = train_model(run, k, build["items"])
    evaluation = evaluate(run, k, ref)
    row = metrics_for(run, k, ref, build, trained, evaluation, new_samples, len(pool))
    append_metrics(run.dir, row)
    write_timing_summary(run.dir)
    return row


# ---------------------------------------------------------------- phases, in the order they run

def sample_train_split(run: Run, k: int) -> list[Sample]:
    """Iteration k-1's model samples the train split into iter{k}/samples.jsonl (resumable)."""
    source = model_ref(run, k - 1)
    sampling = replace(run.config.sampling, seed=derive_seed(run.config.seed, "train-samples", k))
    store = SampleStore(iter_dir(run.dir, k) / "samples.jsonl", {
        **store_identity(run, source, "train", run.config.task.train_limit),
        "sampling": sampling.to_dict(), "iteration": k,
    })
    expected = {(ex.id, j) for ex in run.train_examples for j in range(sampling.n)}
    if expected - store.done():
        sample_into(run, k, "sampling", source, run.train_examples, sampling, store, iteration=k)
    return [s for s in store.samples() if (s.example_id, s.sample_index) in expected]


def gather_pool(run: Run, k: int) -> list[Sample]:
    """All samples drawn at iterations 1..k (each store complete), oldest model first."""
    samples: list[Sample] = []
    n = run.config.sampling.n
    for j in range(1, k + 1):
        path = iter_dir(run.dir, j) / "samples.jsonl"
        found = SampleStore(path).samples() if path.exists() else []
        have = {(s.example_id, s.sample_index) for s in found}
        missing = [(ex.id, i) for ex in run.train_examples for i in range(n) if (ex.id, i) not in have]
        if missing:
            raise DataError(f"iteration {j}'s samples are incomplete ({len(missing)} missing)", path=path)
        for sample in found:
            if sample.iteration != j:
                raise DataError(f"sample says iteration {sample.iteration}, but is stored for iteration {j}",
                                path=path, record=sample.example_id)
        samples += found
    return samples


def build_items(run: Run, k: int, pool: Sequence[Sample]) -> dict[str, Any]:
    """Iteration k's training mixture (iter{k}/train_items.jsonl), with counts and over-long items."""
    folder = iter_dir(run.dir, k)
    items_path, marker = folder / "train_items.jsonl", folder / "build.json"
    if marker.exists() and items_path.exists():
        info = json.loads(marker.read_text())
        return {**info, "items": [TrainItem.from_dict(record) for record in read_jsonl(items_path)]}
    with run.phase(k, "building"):
        result = build_mixture(run.task, run.train_examples, pool, run.config.build, k, run.warmup)
        write_jsonl(items_path, result.items)
        over_length = over_long_items(run, k, result.items)
        info = {"counts": result.counts, "stats": result.stats, "pool_samples": len(pool), "over_length": over_length}
        atomic_write_json(marker, info)
    counts = ", ".join(f"{kind} {n}" for kind, n in result.counts.items() if n)
    run.log(f"  built {len(result.items)} items ({counts})")
    for what, by_kind in over_length.items():
        if by_kind:
            run.log(f"  [yellow]{sum(by_kind.values())} item(s) longer than max_length={run.train_config.max_length} "
                    f"will be {what} ({', '.join(f'{kind} {n}' for kind, n in sorted(by_kind.items()))})[/]")
    return {**info, "items": result.items}


def train_model(run: Run, k: int, items: list[TrainItem]) -> tuple[ModelRef, dict[str, Any] | None]:
    """Train iteration k's model (or reuse it); iter{k}/model.json marks it done."""
    marker = iter_dir(run.dir, k) / "model.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        return ModelRef(**done["ref"]), done["train"]
    if k == 0 and run.config.warmup.skip_training:
        ref, summary = ModelRef(run.config.model), None
    else:
        from r3v.train import launch_job, run_job, wait_for_job

        job_path = write_train_job(run, k)
        release_backend(run)  # the trainer needs the memory the generation model holds
        launch = run.config.launch
        separate = trains_separately(run)
        with run.phase(k, "training") as measured:
            if launch.process == "external":
                result = wait_for_job(job_path, echo=run.log)
            elif separate:
                run.log(f"  training in a process of its own ({launch.num_processes} process(es)); "
                        f"log: {iter_dir(run.dir, k) / 'model' / 'train_process.log'}")
                accelerate = str(config_file(launch.accelerate_config, "accelerate")) if launch.accelerate_config else None
                result = launch_job(job_path, launch.num_processes, accelerate)
            else:
                result = run_job(job_path, examples=run.examples_by_id)
            measured["tokens"] = result.tokens
            measured["child"] = result.resources if separate else None
        relative = str(Path(result.output_path).resolve().relative_to(run.dir.resolve()))
        start = start_ref(run, k)
        if result.is_adapter:
            ref = ModelRef(model=start.model, adapter=relative, model_in_run=start.model_in_run)
        else:
            ref = ModelRef(model=relative, model_in_run=True)
        summary = train_summary(result)
        losses = ", ".join(f"{name} {value:.4f}" for name, value in summary["losses"].items())
        run.log(f"  trained {summary['steps']} steps in {summary['seconds']:.1f} s (losses: {losses})")
    atomic_write_json(marker, {"ref": asdict(ref), "train": summary})
    return ref, summary


def evaluate(run: Run, k: int, ref: ModelRef) -> dict[str, Any]:
    """Test@1 (greedy) and, from iteration 1, selection over sampled candidates."""
    from r3v.bench import evaluate_selection

    config = run.config
    eval_dir = iter_dir(run.dir, k) / "eval"
    marker = eval_dir / "results.json"
    if marker.exists():
        return json.loads(marker.read_text())
    greedy = Sampling.greedy_decoding(max_new_tokens=config.eval_tokens, seed=derive_seed(config.seed, "greedy", k))
    identity = store_identity(run, ref, "test", config.task.test_limit)
    store = SampleStore(eval_dir / "greedy.jsonl", {**identity, "sampling": greedy.to_dict()})
    wanted = {ex.id for ex in run.test_examples}
    if wanted - {example_id for example_id, _ in store.done()}:
        sample_into(run, k, "evaluation", ref, run.test_examples, greedy, store, scoring=False)
    firsts = [s for s in store.samples() if s.example_id in wanted and s.sample_index == 0]
    results: dict[str, Any] = {"test_accuracy": sum(s.correct for s in firsts) / len(firsts), "selection": None}
    n = config.eval.samples
    if k >= 1 and n > 0:
        sampling = replace(config.sampling, n=n, max_new_tokens=config.eval_tokens,
                           seed=derive_seed(config.seed, "test-samples", k))
        store = SampleStore(eval_dir / "samples.jsonl", {**identity, "sampling": sampling.to_dict()})
        expected = {(ex.id, j) for ex in run.test_examples for j in range(n)}
        if expected - store.done():
            sample_into(run, k, "evaluation", ref, run.test_examples, sampling, store, scoring=False)
        samples = [s for s in store.samples() if (s.example_id, s.sample_index) in expected]
        backend = load_backend(run, ref, k)
        with run.phase(k, "evaluation"):
            results["selection"] = evaluate_selection(
                backend, run.task, run.test_examples, samples, ks=[n], selector_names=ALL,
                seed=derive_seed(config.seed, "select", k), max_new_tokens=config.eval_tokens,
                select=config.eval.select,
            )
    atomic_write_json(marker, results)
    line = f"  Test@1 {results['test_accuracy']:.3f}"
    if results["selection"]:
        line += f", self-select@{n} {results['selection']['accuracy'][SELF_SELECT]:.3f}"
    run.log(line)
    return results


def metrics_for(run: Run, k: int, ref: ModelRef, build: dict[str, Any], trained: dict[str, Any] | None,
                evaluation: dict[str, Any], new_samples: Sequence[Sample], pool_size: int) -> dict[str, Any]:
    """Iteration k's line in metrics.jsonl."""
    selection = evaluation.get("selection")
    counts = build["counts"]
    objectives: dict[str, int] = {}
    for kind, count in counts.items():
        objectives[OBJECTIVE_OF_KIND.get(kind, kind)] = objectives.get(OBJECTIVE_OF_KIND.get(kind, kind), 0) + count
    return {
        "iteration": k,
        "method": run.config.build.method,
        "model": ref.label(),
        "test_accuracy": evaluation["test_accuracy"],
        "select_accuracy": selection["accuracy"][SELF_SELECT] if selection else None,
        "majority_accuracy": selection["accuracy"][MAJORITY] if selection else None,
        "first_sample_accuracy": selection["accuracy"][FIRST] if selection else None,
        "pass_at_n": selection["accuracy"][ORACLE] if selection else None,
        "eval_samples": run.config.eval.samples if selection else 0,
        "select_how": selection["counts"][SELF_SELECT] if selection else None,
        # what selection cost per question at N (prompt, completions, self-select's own call)
        # (None for an evaluation an older r3v stored)
        "selection_compute": {name: {key: selection["compute"][str(selection["n"])][name][key]
                                     for key in ("tokens_per_question", "seconds_per_question")}
                              for name in (SELF_SELECT, MAJORITY)} if selection and "compute" in selection else None,
        "selection_diagnostics": selection["diagnostics"][SELF_SELECT] if selection and "diagnostics" in selection else None,
        "pool": pool_summary(build["stats"]),
        "test_questions": len(run.test_examples),
        "items": counts,
        "items_per_objective": objectives,
        "build": build["stats"],
        "over_length": build.get("over_length", {}),
        "pool_samples": pool_size,
        "train_samples": summarize_samples(new_samples) if new_samples else None,
        "train_losses": trained["losses"] if trained else None,
        "train_steps": trained["steps"] if trained else 0,
        "timing": timing(run.dir, k),
    }


# ---------------------------------------------------------------- helpers of the phases

def sample_into(run: Run, k: int, phase: str, ref: ModelRef, examples: Sequence[Example], sampling: Sampling,
                store: SampleStore, iteration: int | None = None, scoring: bool = True) -> None:
    """Fill ``store`` with ``ref``'s samples, timing the phase apart from the answer scoring."""
    backend = load_backend(run, ref, k)
    timed = TimedTask(run.task)
    label = f"iteration {k}: {'sampling train' if phase == 'sampling' else 'evaluating'}"

    with run.phase(k, phase) as measured:
        def on_chunk(done: int, total: int, new: list[Sample]) -> None:
            measured["tokens"] += sum(s.completion_tokens for s in new)
            measured["prompt_tokens"] += sum(s.prompt_tokens for s in new if s.sample_index == 0)  # one prefill each
            run.progress(label, done, total)

        try:
            sample_examples(backend, timed, examples, sampling, store, chunk_size=run.config.backend.chunk_size,
                            iteration=iteration, on_chunk=on_chunk, engine_batch=run.config.backend.engine_batch)
        finally:
            if scoring:  # answer scoring happens while sampling: its seconds are booked apart
                measured["unmeasured"] = timed.seconds
    if scoring:
        from r3v.rundir import add_time

        add_time(run.dir, k, "scoring", timed.seconds)


def model_ref(run: Run, k: int) -> ModelRef:
    marker = iter_dir(run.dir, k) / "model.json"
    if not marker.exists():
        raise DataError(f"iteration {k} has no finished model", path=marker)
    return ModelRef(**json.loads(marker.read_text())["ref"])


def start_ref(run: Run, k: int) -> ModelRef:
    """The weights iteration k starts from: the base, or iteration k-1's model (--continue)."""
    if run.config.from_base or k == 0:
        return ModelRef(run.config.model)
    return model_ref(run, k - 1)


def store_identity(run: Run, ref: ModelRef, split: str, limit: int | None) -> dict[str, Any]:
    """What a sample store of the run pins in its manifest."""
    return {
        "model": ref.model, "adapter": ref.adapter, "model_in_run": ref.model_in_run,
        "backend": run.config.backend.name, "task": run.config.task.name, "split": split, "limit": limit,
        "data_dir": run.settings["data_dir"], "prompt": "cot", "chunk_size": run.config.backend.chunk_size,
    }


def trains_separately(run: Run) -> bool:
    """Whether training runs in a process of its own (see ``LaunchConfig.process``)."""
    launch = run.config.launch
    if launch.process != "auto":
        return launch.process in ("separate", "external")
    if launch.num_processes > 1 or launch.accelerate_config:
        return True
    import torch

    return torch.cuda.is_available() and "cpu" not in str(run.config.backend.options.get("device", ""))


def write_train_job(run: Run, k: int) -> Path:
    """iter{k}/train_job.yaml: everything iteration k's training needs, runnable by hand with
    ``python -m r3v.train --job`` (or under ``accelerate launch``)."""
    from r3v.train.job import ExampleSource, TrainJob, job_reference

    folder = iter_dir(run.dir, k)
    start = start_ref(run, k)
    spec = run.config.task
    job = TrainJob(
        model=job_reference(start.model_path(run.dir), folder), items="train_items.jsonl", out="model",
        config=replace(run.train_config, seed=derive_seed(run.config.seed, "train", k)),
        init_adapter=job_reference(start.adapter_path(run.dir), folder),
        examples=ExampleSource(task=spec.name, split="train", data_dir=run.settings["data_dir"], limit=spec.train_limit,
                               task_args=dict(spec.args), skip_bad=spec.skip_bad,
                               allow_outside_paths=spec.allow_outside_paths),
        resume=True, tracking_dir=f"../{TRACKING_DIR}" if run.train_config.report_to else None, run_name=f"iter{k}",
    )
    return job.write(folder / "train_job.yaml")


def over_long_items(run: Run, k: int, items: Sequence[TrainItem]) -> dict[str, dict[str, int]]:
    """Items too long for ``max_length``, per kind: skipped (the prompt alone is too long) and
    truncated (the target is cut). Measured from text and image sizes; nothing is encoded."""
    from r3v.train.data import ItemDataset

    processor = processor_of(run, start_ref(run, k).model_path(run.dir))
    return ItemDataset(processor, items, run.examples_by_id, run.train_config.max_length, cache_bytes=0).over_length


def processor_of(run: Run, model: str) -> Any:
    """The model's processor at the run's pixel cap (loaded once per model)."""
    if model not in run.processors:
        from r3v.models.loading import resolve_model
        from r3v.models.processors import load_processor, set_pixel_cap

        processor = load_processor(resolve_model(model), run.config.backend.trust_remote_code)
        if run.train_config.max_pixels is not None:
            set_pixel_cap(processor, run.train_config.max_pixels)
        run.processors[model] = processor
    return run.processors[model]


def load_backend(run: Run, ref: ModelRef, k: int) -> Any:
    """A backend for ``ref``, reusing the loaded one when it is the same model; k books the time."""
    if run.backend is not None and run.backend_ref == ref:
        return run.backend
    from r3v.registry import backends

    release_backend(run)
    options = dict(run.config.backend.options)
    if run.train_config.max_pixels is not None:  # sample at the resolution the model trains on
        options.setdefault("max_pixels", run.train_config.max_pixels)
    with run.phase(k, "loading"):
        run.backend = backends.get(run.config.backend.name)(
            model=ref.model_path(run.dir), adapter=ref.adapter_path(run.dir),
            trust_remote_code=run.config.backend.trust_remote_code, **options,
        )
    # Samples record the backend's model_id; the run-relative label keeps them free of this
    # machine's paths, so a run moved or resumed elsewhere writes the same files.
    run.backend.model_id = ref.label()
    run.backend_ref = ref
    return run.backend


def release_backend(run: Run) -> None:
    """Drop the generation model and hand its memory back (vLLM: shut its engine down)."""
    if run.backend is None:
        return
    close = getattr(run.backend, "close", None)
    if close is not None:  # vLLM runs its engine in processes of its own that must be shut down
        close()
    run.backend = run.backend_ref = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return_freed_memory()


def train_summary(result: Any) -> dict[str, Any]:
    """The JSON-ready part of a TrainResult that metrics report."""
    return {
        "losses": dict(result.losses),
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "items_per_objective": dict(getattr(result, "items_per_objective", {}) or {}),
        "over_length": dict(getattr(result, "over_length", {}) or {}),
        "batch": dict(getattr(result, "batch", {}) or {}),
        "is_adapter": result.is_adapter,
    }
