"""The R3V self-training loop behind ``r3v train --iterations N``.

Iteration 0 is the warm-up: train on direct-answer QA for the whole train split plus distilled
CoT. Each later iteration k (1..N):

1. **sample**: iteration k-1's model samples every train question ``sampling.n`` times; earlier
   iterations' samples are kept, never regenerated;
2. **build**: the mixture (warm-up items + self-CoT / self-refine / self-select) comes from the
   pool of all iterations' samples (``r3v.builders``);
3. **train**: from the base model (R3V's default) or, with ``from_base=False``, from iteration
   k-1's weights;
4. **evaluate** on the test split: Test@1 (greedy) and, from iteration 1 on, self-select over
   ``eval_samples`` sampled candidates (with majority vote and pass@N beside it).

Every phase leaves a completion mark, so a rerun of the same command after a kill continues where
it stopped and ends with the same files as an uninterrupted run:

    RUN_DIR/
      run.json              settings + versions; a rerun with other settings is refused
      metrics.jsonl         one line per finished iteration (appended once)
      timing.json           seconds per phase, per iteration and in total
      iter0/                the warm-up
        train_items.jsonl   the shuffled training mixture
        build.json          items per kind and pool statistics (marks the build done)
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from r3v.backends.base import Sampling
from r3v.builders import BuildConfig, build_mixture, warmup_mixture
from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl_tail
from r3v.manifest import run_manifest
from r3v.meter import PhaseMeter, merge, return_freed_memory
from r3v.metrics import summarize_samples
from r3v.records import OBJECTIVE_OF_KIND, Example, Sample, TrainItem, read_jsonl, write_jsonl
from r3v.store import SampleStore, sample_examples

#: Selectors the evaluation reports beside self-select; none of them calls the model.
EVAL_SELECTORS = ("first", "majority", "self-select", "oracle")

#: The phases timed per iteration. Sampling excludes the answer scoring done while sampling.
PHASES = ("loading", "sampling", "scoring", "building", "training", "evaluation")

TRAINING_PROCESSES = ("auto", "separate", "inline", "external")

#: Trackers' folder in the run directory (``--report-to``): the loop's metrics and each training step.
TRACKING_DIR = "tracking"


@dataclass
class LoopConfig:
    """Everything that decides what an ``r3v train`` run computes."""

    #: Base model: hub id, local folder or built-in name. Every iteration trains from it by default.
    model: str
    #: Registered task name.
    task: str = "clevr-synth"
    #: Self-training iterations after the warm-up (iteration 0).
    iterations: int = 3
    #: How the mixture is built (method preset, select sizes and target).
    build: BuildConfig = field(default_factory=BuildConfig)
    #: Trainer settings (``r3v.train.TrainConfig``); None picks the trainer's default for the model.
    train: Any = None
    #: Train every iteration from the base model (R3V); False continues from the previous weights.
    from_base: bool = True
    #: Use only the first K train / test questions.
    train_limit: int | None = None
    test_limit: int | None = None
    #: Folder with the task's official files (tasks that are not built in).
    data_dir: str | None = None
    #: Options for the task's constructor (``--task-arg KEY=VALUE``).
    task_args: dict[str, Any] = field(default_factory=dict)
    #: Let the task skip bad records and unreadable images instead of stopping (where it can).
    skip_bad: bool = False
    #: Distilled CoT file (R3V warm-up JSON or r3v distill JSONL); None uses the task's teacher.
    warmup_file: str | None = None
    #: Where the images named in an R3V warm-up JSON are (default: the file's folder).
    image_root: str | None = None
    #: Let image paths in data files and the warm-up file point outside their folder.
    allow_outside_paths: bool = False
    #: Questions the task's programmatic teacher writes warm-up CoT for, when no file is given.
    teacher_count: int = 200
    #: Use the base model as iteration 0's model instead of training the warm-up (it is already able
    #: to reason); the warm-up items still join later mixtures.
    skip_warmup_train: bool = False
    #: Train-split sampling per iteration: R3V samples 3 per question at T 0.9, top-p 0.95, top-k 50.
    sampling: Sampling = field(default_factory=lambda: Sampling(n=3))
    #: Candidates per test question for self-select (0: report Test@1 only).
    eval_samples: int = 3
    #: Token limit for evaluation (greedy, candidates and the select call); None: ``sampling.max_new_tokens``.
    eval_max_new_tokens: int | None = None
    #: Questions per sample-store chunk: the unit in which sampling resumes.
    chunk_size: int = 32
    #: Questions per backend call (several chunks at once); None: one chunk per call.
    engine_batch: int | None = None
    #: The one seed every random choice derives from.
    seed: int = 0
    #: Generation backend (see ``r3v list``) and options passed to it (device, engine options such
    #: as tensor_parallel_size; the trainer's ``max_pixels`` is added unless given here).
    backend: str = "hf"
    backend_options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    #: Where training runs: "separate" (a process of its own, which hands all its memory back when
    #: it exits), "inline" (this process), "external" (the loop writes the job and waits for someone
    #: to run it, e.g. ``accelerate launch`` on every node of a cluster), or "auto" (separate when a
    #: GPU is used or ``num_processes`` > 1, else inline).
    training_process: str = "auto"
    #: Training processes (``accelerate launch``), e.g. one per GPU.
    num_processes: int = 1
    #: An accelerate config for training (``configs/accelerate/{ddp,zero2,zero3,fsdp}.yaml``).
    accelerate_config: str | None = None

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError("iterations must be 0 or more")
        if self.sampling.n < 1 or self.sampling.greedy:
            raise ValueError("self-training needs sampled (not greedy) decoding with n >= 1")
        if self.eval_samples < 0:
            raise ValueError("eval_samples must be 0 or more")
        if self.training_process not in TRAINING_PROCESSES:
            raise ValueError(f"training_process must be one of {', '.join(TRAINING_PROCESSES)}, not {self.training_process!r}")
        if self.num_processes < 1:
            raise ValueError("num_processes must be at least 1")
        if self.training_process == "inline" and (self.num_processes > 1 or self.accelerate_config):
            raise ValueError("several training processes or an accelerate config need training_process separate (or auto)")
        # one seed rules them all: the builder's shuffles follow the run's seed
        self.build = replace(self.build, seed=self.seed)

    @property
    def eval_tokens(self) -> int:
        return self.eval_max_new_tokens or self.sampling.max_new_tokens

    def settings(self, train_settings: dict[str, Any]) -> dict[str, Any]:
        """What must match for a rerun to continue this run (``iterations`` may grow)."""
        return {
            "model": self.model,
            "task": self.task,
            "task_args": self.task_args,
            "skip_bad": self.skip_bad,
            "allow_outside_paths": self.allow_outside_paths,
            "build": self.build.to_dict(),
            "train": train_settings,
            "from_base": self.from_base,
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "warmup_file": _file_identity(self.warmup_file),
            "image_root": str(Path(self.image_root).resolve()) if self.image_root else None,
            "teacher_count": self.teacher_count if self.warmup_file is None else None,
            "skip_warmup_train": self.skip_warmup_train,
            "sampling": {k: v for k, v in self.sampling.to_dict().items() if k != "seed"},
            "eval_samples": self.eval_samples,
            "eval_max_new_tokens": self.eval_tokens,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "backend": self.backend,
        }


def _file_identity(path: str | None) -> dict[str, str] | None:
    """A file by content: editing the warm-up file changes the run, moving it does not."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise DataError(f"warm-up file not found: {file}", path=file)
    return {"name": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed for one purpose of one iteration, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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

    def __init__(self, task: Any) -> None:
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


Progress = Callable[[str, int, int], None]


def _quiet(*_: Any) -> None:
    return None


class Loop:
    """One run directory's iterations; ``run()`` does (or finishes) them all."""

    def __init__(self, config: LoopConfig, out_dir: str | Path, log: Callable[[str], None] = print,
                 progress: Progress = _quiet, task: Any = None) -> None:
        """``task`` may be passed already built (from ``config``'s task options); else it is built here."""
        from r3v.warmup import distill_items

        self.config = config
        self.run_dir = Path(out_dir)
        self.log = log
        self.progress = progress
        self.task = task if task is not None else build_task(config)
        if config.train is None:
            from r3v.train import TrainConfig  # torch and transformers load only when a loop runs

            self.train_config = TrainConfig.for_model(config.model)
        else:
            self.train_config = config.train
        self.train_examples = self.task.load("train", data_dir=config.data_dir, limit=config.train_limit)
        self.test_examples = self.task.load("test", data_dir=config.data_dir, limit=config.test_limit)
        if not self.train_examples or not self.test_examples:
            raise DataError(f"task {config.task!r} gave no train or no test questions")
        self.examples_by_id = {ex.id: ex for ex in self.train_examples}
        self.settings = config.settings(_as_settings(self.train_config))
        distill = distill_items(
            self.task, self.train_examples, config.warmup_file, config.image_root, config.teacher_count,
            config.allow_outside_paths,
        )
        # only once the inputs parsed: a bad warm-up file must not pin a new run directory
        check_run_dir(self.run_dir, self.settings, self.execution())
        if not distill:
            log(f"warning: no distilled CoT for {config.task!r}, so the warm-up is QA only. "
                "Pass --warmup-file (see r3v distill) to give the model worked solutions to start from.")
        self.warmup = warmup_mixture(self.task, self.train_examples, distill)
        self._backend: Any = None
        self._backend_ref: ModelRef | None = None
        self._processors: dict[str, Any] = {}
        self._tracker: Any = None

    def execution(self) -> dict[str, Any]:
        """How this run executes: engine options and training processes (not part of its identity)."""
        config = self.config
        return {"backend": config.backend, "backend_options": dict(config.backend_options),
                "engine_batch": config.engine_batch, "chunk_size": config.chunk_size,
                "training_process": config.training_process, "num_processes": config.num_processes,
                "accelerate_config": config.accelerate_config}

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[dict[str, Any]]:
        """Run iterations 0..N; finished ones are skipped. Returns all metrics rows."""
        from r3v.tracking import LoopTracker

        try:
            for k in range(self.config.iterations + 1):
                if self.metrics_row(k) is not None:
                    self.log(f"iteration {k}: already finished")
                    continue
                row = self.iteration(k)
                if self.train_config.report_to:
                    if self._tracker is None:
                        self._tracker = LoopTracker(self.train_config.report_to, self.run_dir / TRACKING_DIR,
                                                    self.run_dir.name, self.settings, log=self.log)
                    self._tracker.log_iteration(row)
        finally:
            self.release()
            self.write_timing_summary()
            if self._tracker is not None:
                self._tracker.finish()
        return self.metrics_rows()

    def iteration(self, k: int) -> dict[str, Any]:
        self.log(f"iteration {k}" + (" (warm-up)" if k == 0 else ""))
        new_samples = self.sample_phase(k) if k > 0 else []
        pool = self.pool(k)
        build = self.build_phase(k, pool)
        ref, trained = self.train_phase(k, build["items"])
        evaluation = self.eval_phase(k, ref)
        row = self.metrics_for(k, ref, build, trained, evaluation, new_samples, len(pool))
        self.append_metrics(row)
        self.write_timing_summary()
        return row

    def iter_dir(self, k: int) -> Path:
        return self.run_dir / f"iter{k}"

    # ---------------------------------------------------------------- phases

    def sample_phase(self, k: int) -> list[Sample]:
        """Iteration k-1's model samples the train split into iter{k}/samples.jsonl (resumable)."""
        source = self.model_ref(k - 1)
        sampling = replace(self.config.sampling, seed=derive_seed(self.config.seed, "train-samples", k))
        store = SampleStore(self.iter_dir(k) / "samples.jsonl", {
            **self.store_identity(source, "train", self.config.train_limit),
            "sampling": sampling.to_dict(), "iteration": k,
        })
        expected = {(ex.id, j) for ex in self.train_examples for j in range(sampling.n)}
        if expected - store.done():
            backend = self.backend(source, k)
            self._sample(k, "sampling", backend, self.train_examples, sampling, store, iteration=k)
        return [s for s in store.samples() if (s.example_id, s.sample_index) in expected]

    def pool(self, k: int) -> list[Sample]:
        """All samples drawn at iterations 1..k (each store complete), oldest model first."""
        samples: list[Sample] = []
        n = self.config.sampling.n
        for j in range(1, k + 1):
            path = self.iter_dir(j) / "samples.jsonl"
            found = SampleStore(path).samples() if path.exists() else []
            have = {(s.example_id, s.sample_index) for s in found}
            missing = [(ex.id, i) for ex in self.train_examples for i in range(n) if (ex.id, i) not in have]
            if missing:
                raise DataError(f"iteration {j}'s samples are incomplete ({len(missing)} missing)", path=path)
            for sample in found:
                if sample.iteration != j:
                    raise DataError(f"sample says iteration {sample.iteration}, but is stored for iteration {j}",
                                    path=path, record=sample.example_id)
            samples += found
        return samples

    def build_phase(self, k: int, pool: Sequence[Sample]) -> dict[str, Any]:
        items_path, marker = self.iter_dir(k) / "train_items.jsonl", self.iter_dir(k) / "build.json"
        if marker.exists() and items_path.exists():
            info = json.loads(marker.read_text())
            items = [TrainItem.from_dict(record) for record in read_jsonl(items_path)]
            return {**info, "items": items}
        with self.phase(k, "building"):
            result = build_mixture(self.task, self.train_examples, pool, self.config.build, k, self.warmup)
            write_jsonl(items_path, result.items)
            over_length = self.over_length(k, result.items)
            info = {"counts": result.counts, "stats": result.stats, "pool_samples": len(pool),
                    "over_length": over_length}
            atomic_write_json(marker, info)
        counts = ", ".join(f"{kind} {n}" for kind, n in result.counts.items() if n)
        self.log(f"  built {len(result.items)} items ({counts})")
        for what, by_kind in over_length.items():
            if by_kind:
                self.log(f"  [yellow]{sum(by_kind.values())} item(s) longer than max_length={self.train_config.max_length} "
                         f"will be {what} ({', '.join(f'{kind} {n}' for kind, n in sorted(by_kind.items()))})[/]")
        return {**info, "items": result.items}

    def over_length(self, k: int, items: Sequence[TrainItem]) -> dict[str, dict[str, int]]:
        """Items too long for ``max_length``, per kind: skipped (the prompt alone is too long) and
        truncated (the target is cut). Measured from text and image sizes; nothing is encoded."""
        from r3v.collate import ItemDataset

        processor = self.processor(self.start_point(k)[0])
        return ItemDataset(processor, items, self.examples_by_id, self.train_config.max_length, cache_bytes=0).over_length

    def processor(self, model: str) -> Any:
        if model not in self._processors:
            from r3v.models.loading import load_processor, resolve_model, set_pixel_cap

            processor = load_processor(resolve_model(model), self.config.trust_remote_code)
            if self.train_config.max_pixels is not None:
                set_pixel_cap(processor, self.train_config.max_pixels)
            self._processors[model] = processor
        return self._processors[model]

    def train_phase(self, k: int, items: list[TrainItem]) -> tuple[ModelRef, dict[str, Any] | None]:
        """Train iteration k's model (or reuse it); iter{k}/model.json marks it done."""
        marker = self.iter_dir(k) / "model.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            return ModelRef(**done["ref"]), done["train"]
        if k == 0 and self.config.skip_warmup_train:
            ref, summary = ModelRef(self.config.model), None
        else:
            from r3v.train import launch_job, run_job, wait_for_job

            job_path = self.write_train_job(k)
            self.release()  # the trainer needs the memory the generation model holds
            separate = self.trains_separately()
            with self.phase(k, "training") as measured:
                if self.config.training_process == "external":
                    result = wait_for_job(job_path, echo=self.log)
                elif separate:
                    self.log(f"  training in a process of its own ({self.config.num_processes} process(es)); "
                             f"log: {self.iter_dir(k) / 'model' / 'train_process.log'}")
                    result = launch_job(job_path, self.config.num_processes, self.config.accelerate_config)
                else:
                    result = run_job(job_path, examples=self.examples_by_id)
                measured["tokens"] = result.tokens
                measured["child"] = result.resources if separate else None
            relative = str(Path(result.output_path).resolve().relative_to(self.run_dir.resolve()))
            if result.is_adapter:
                ref = ModelRef(model=self.start_ref(k).model, adapter=relative,
                               model_in_run=self.start_ref(k).model_in_run)
            else:
                ref = ModelRef(model=relative, model_in_run=True)
            summary = train_summary(result)
            losses = ", ".join(f"{name} {value:.4f}" for name, value in summary["losses"].items())
            self.log(f"  trained {summary['steps']} steps in {summary['seconds']:.1f} s (losses: {losses})")
        atomic_write_json(marker, {"ref": asdict(ref), "train": summary})
        return ref, summary

    def trains_separately(self) -> bool:
        """Whether training runs in a process of its own (see ``LoopConfig.training_process``)."""
        if self.config.training_process != "auto":
            return self.config.training_process in ("separate", "external")
        if self.config.num_processes > 1 or self.config.accelerate_config:
            return True
        import torch

        return torch.cuda.is_available() and "cpu" not in str(self.config.backend_options.get("device", ""))

    def write_train_job(self, k: int) -> Path:
        """iter{k}/train_job.yaml: everything iteration k's training needs, runnable by hand with
        ``python -m r3v.train --job`` (or under ``accelerate launch``)."""
        from r3v.train import ExampleSource, TrainJob, job_reference

        folder = self.iter_dir(k)
        base, init_adapter = self.start_point(k)
        config = self.config
        job = TrainJob(
            model=job_reference(base, folder), items="train_items.jsonl", out="model",
            config=replace(self.train_config, seed=derive_seed(config.seed, "train", k)),
            init_adapter=job_reference(init_adapter, folder),
            examples=ExampleSource(task=config.task, split="train", data_dir=self.settings["data_dir"],
                                   limit=config.train_limit, task_args=dict(config.task_args), skip_bad=config.skip_bad,
                                   allow_outside_paths=config.allow_outside_paths),
            resume=True, tracking_dir=f"../{TRACKING_DIR}" if self.train_config.report_to else None,
            run_name=f"iter{k}",
        )
        return job.write(folder / "train_job.yaml")

    def start_ref(self, k: int) -> ModelRef:
        """The weights iteration k starts from: the base, or iteration k-1's model (--continue)."""
        if self.config.from_base or k == 0:
            return ModelRef(self.config.model)
        return self.model_ref(k - 1)

    def start_point(self, k: int) -> tuple[str, str | None]:
        ref = self.start_ref(k)
        return ref.model_path(self.run_dir), ref.adapter_path(self.run_dir)

    def eval_phase(self, k: int, ref: ModelRef) -> dict[str, Any]:
        """Test@1 (greedy) and, from iteration 1, selection over sampled candidates."""
        from r3v.bench import evaluate_selection

        eval_dir = self.iter_dir(k) / "eval"
        marker = eval_dir / "results.json"
        if marker.exists():
            return json.loads(marker.read_text())
        greedy = Sampling.greedy_decoding(max_new_tokens=self.config.eval_tokens, seed=derive_seed(self.config.seed, "greedy", k))
        identity = self.store_identity(ref, "test", self.config.test_limit)
        store = SampleStore(eval_dir / "greedy.jsonl", {**identity, "sampling": greedy.to_dict()})
        wanted = {ex.id for ex in self.test_examples}
        if wanted - {example_id for example_id, _ in store.done()}:
            self._sample(k, "evaluation", self.backend(ref, k), self.test_examples, greedy, store, scoring=False)
        firsts = [s for s in store.samples() if s.example_id in wanted and s.sample_index == 0]
        results: dict[str, Any] = {"test_accuracy": sum(s.correct for s in firsts) / len(firsts), "selection": None}
        n = self.config.eval_samples
        if k >= 1 and n > 0:
            sampling = replace(self.config.sampling, n=n, max_new_tokens=self.config.eval_tokens,
                               seed=derive_seed(self.config.seed, "test-samples", k))
            store = SampleStore(eval_dir / "samples.jsonl", {**identity, "sampling": sampling.to_dict()})
            expected = {(ex.id, j) for ex in self.test_examples for j in range(n)}
            if expected - store.done():
                self._sample(k, "evaluation", self.backend(ref, k), self.test_examples, sampling, store, scoring=False)
            samples = [s for s in store.samples() if (s.example_id, s.sample_index) in expected]
            backend = self.backend(ref, k)
            with self.phase(k, "evaluation"):
                selection = evaluate_selection(
                    backend, self.task, self.test_examples, samples, ks=[n],
                    selector_names=EVAL_SELECTORS, seed=derive_seed(self.config.seed, "select", k),
                    max_new_tokens=self.config.eval_tokens,
                )
            results["selection"] = selection
        atomic_write_json(marker, results)
        line = f"  Test@1 {results['test_accuracy']:.3f}"
        if results["selection"]:
            line += f", self-select@{n} {results['selection']['accuracy']['self-select']:.3f}"
        self.log(line)
        return results

    def _sample(self, k: int, phase: str, backend: Any, examples: Sequence[Example], sampling: Sampling,
                store: SampleStore, iteration: int | None = None, scoring: bool = True) -> None:
        timed = TimedTask(self.task)
        label = f"iteration {k}: {'sampling train' if phase == 'sampling' else 'evaluating'}"
        tokens = prompt_tokens = 0

        def on_chunk(done: int, total: int, new: list[Sample]) -> None:
            nonlocal tokens, prompt_tokens
            tokens += sum(s.completion_tokens for s in new)
            prompt_tokens += sum(s.prompt_tokens for s in new if s.sample_index == 0)  # one prefill per question
            self.progress(label, done, total)

        meter = PhaseMeter()
        try:
            with meter:
                sample_examples(
                    backend, timed, examples, sampling, store, chunk_size=self.config.chunk_size, iteration=iteration,
                    on_chunk=on_chunk, engine_batch=self.config.engine_batch,
                )
        finally:
            # answer scoring happens while sampling: its seconds are booked apart
            scored = timed.seconds if scoring else 0.0
            meter.seconds -= scored
            self.add_time(k, phase, meter.seconds)
            self.add_resources(k, phase, meter.record(tokens, prompt_tokens=prompt_tokens))
            if scoring:
                self.add_time(k, "scoring", scored)

    # ---------------------------------------------------------------- models

    def model_ref(self, k: int) -> ModelRef:
        marker = self.iter_dir(k) / "model.json"
        if not marker.exists():
            raise DataError(f"iteration {k} has no finished model", path=marker)
        return ModelRef(**json.loads(marker.read_text())["ref"])

    def store_identity(self, ref: ModelRef, split: str, limit: int | None) -> dict[str, Any]:
        return {
            "model": ref.model, "adapter": ref.adapter, "model_in_run": ref.model_in_run,
            "backend": self.config.backend, "task": self.config.task, "split": split, "limit": limit,
            "data_dir": self.settings["data_dir"], "prompt": "cot", "chunk_size": self.config.chunk_size,
        }

    def backend(self, ref: ModelRef, k: int) -> Any:
        """A backend for ``ref``, reusing the loaded one when it is the same model; k books the time."""
        if self._backend is not None and self._backend_ref == ref:
            return self._backend
        from r3v.registry import backends

        self.release()
        options = dict(self.config.backend_options)
        if self.train_config.max_pixels is not None:  # sample at the resolution the model trains on
            options.setdefault("max_pixels", self.train_config.max_pixels)
        with self.phase(k, "loading"):
            self._backend = backends.get(self.config.backend)(
                model=ref.model_path(self.run_dir), adapter=ref.adapter_path(self.run_dir),
                trust_remote_code=self.config.trust_remote_code, **options,
            )
        # Samples record the backend's model_id; the run-relative label keeps them free of this
        # machine's paths, so a run moved or resumed elsewhere writes the same files.
        self._backend.model_id = ref.label()
        self._backend_ref = ref
        return self._backend

    def release(self) -> None:
        if self._backend is None:
            return
        close = getattr(self._backend, "close", None)
        if close is not None:  # vLLM runs its engine in a child process that must be shut down
            close()
        self._backend = self._backend_ref = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return_freed_memory()

    # ---------------------------------------------------------------- records

    def metrics_rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        repair_jsonl_tail(path)
        return [record for _, record in iter_jsonl(path)]

    def metrics_row(self, k: int) -> dict[str, Any] | None:
        return next((row for row in self.metrics_rows() if row.get("iteration") == k), None)

    def append_metrics(self, row: dict[str, Any]) -> None:
        if self.metrics_row(row["iteration"]) is not None:
            return  # a rerun must not log an iteration twice
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            append_jsonl(handle, [row])

    def metrics_for(self, k: int, ref: ModelRef, build: dict[str, Any], trained: dict[str, Any] | None,
                    evaluation: dict[str, Any], new_samples: Sequence[Sample], pool_size: int) -> dict[str, Any]:
        selection = evaluation.get("selection")
        n = self.config.eval_samples
        counts = build["counts"]
        objectives: dict[str, int] = {}
        for kind, count in counts.items():
            objectives[OBJECTIVE_OF_KIND.get(kind, kind)] = objectives.get(OBJECTIVE_OF_KIND.get(kind, kind), 0) + count
        row: dict[str, Any] = {
            "iteration": k,
            "method": self.config.build.method,
            "model": ref.label(),
            "test_accuracy": evaluation["test_accuracy"],
            "select_accuracy": selection["accuracy"]["self-select"] if selection else None,
            "majority_accuracy": selection["accuracy"]["majority"] if selection else None,
            "first_sample_accuracy": selection["accuracy"]["first"] if selection else None,
            "pass_at_n": selection["accuracy"]["oracle"] if selection else None,
            "eval_samples": n if selection else 0,
            "select_how": selection["counts"]["self-select"] if selection else None,
            "test_questions": len(self.test_examples),
            "items": counts,
            "items_per_objective": objectives,
            "build": build["stats"],
            "over_length": build.get("over_length", {}),
            "pool_samples": pool_size,
            "train_samples": summarize_samples(new_samples) if new_samples else None,
            "train_losses": trained["losses"] if trained else None,
            "train_steps": trained["steps"] if trained else 0,
            "timing": self.timing(k),
        }
        return row

    # ---------------------------------------------------------------- timing

    @contextmanager
    def phase(self, k: int, name: str) -> Iterator[dict[str, Any]]:
        """Time and measure one phase of iteration k. The caller may set ``tokens`` (work done) and
        ``child`` (peaks a process of its own reported) in the dict it gets."""
        measured: dict[str, Any] = {"tokens": 0, "child": None}
        meter = PhaseMeter()
        try:
            with meter:
                yield measured
        finally:
            self.add_time(k, name, meter.seconds)
            self.add_resources(k, name, meter.record(measured["tokens"], measured["child"]))

    def add_resources(self, k: int, phase: str, record: dict[str, Any]) -> None:
        """Fold a phase's measurement into RUN_DIR/resources.json (seconds, tokens, peak memory)."""
        path = self.run_dir / "resources.json"
        data = json.loads(path.read_text()) if path.exists() else {"iterations": {}}
        phases = data["iterations"].setdefault(str(k), {})
        phases[phase] = merge(phases.get(phase, {}), record)
        data["device"] = _device_label()
        atomic_write_json(path, data)

    def timing(self, k: int) -> dict[str, float]:
        path = self.iter_dir(k) / "timing.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        return {phase: round(stored.get(phase, 0.0), 3) for phase in PHASES}

    def add_time(self, k: int, phase: str, seconds: float) -> None:
        """Add seconds to a phase of iteration k; work of a killed run that was redone counts once."""
        current = self.timing(k)
        current[phase] = current.get(phase, 0.0) + seconds
        atomic_write_json(self.iter_dir(k) / "timing.json", current)

    def write_timing_summary(self) -> dict[str, Any]:
        # every iteration on disk, also those past a smaller --iterations given on a rerun
        done = sorted(int(p.parent.name[4:]) for p in self.run_dir.glob("iter*/timing.json") if p.parent.name[4:].isdigit())
        per_iteration = {str(k): self.timing(k) for k in done}
        total = {phase: round(sum(t[phase] for t in per_iteration.values()), 3) for phase in PHASES}
        summary = {"iterations": per_iteration, "total": total, "seconds": round(sum(total.values()), 3)}
        if per_iteration:
            atomic_write_json(self.run_dir / "timing.json", summary)
        return summary


def _as_settings(train_config: Any) -> dict[str, Any]:
    data = asdict(train_config) if hasattr(train_config, "__dataclass_fields__") else dict(train_config)
    return json.loads(json.dumps(data, default=str))


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


def _device_label() -> str:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return "cpu"


def check_run_dir(run_dir: Path, settings: dict[str, Any], execution: dict[str, Any] | None = None) -> None:
    """Write run.json for a new run; for an existing one, refuse settings that differ.

    ``execution`` records how the run is executed (backend engine options, training processes):
    it may change between a run and its continuation, so it is written (as of the latest start) but
    never compared.
    """
    normalized = json.loads(json.dumps(settings, default=str))
    manifest = run_dir / "run.json"
    if manifest.exists():
        record = json.loads(manifest.read_text())
        stored = record.get("settings", {})
        if stored != normalized:
            before, after = _flatten(stored), _flatten(normalized)
            diffs = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
                     for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
            raise DataError(
                f"{run_dir} holds a run with other settings ({'; '.join(diffs)}). "
                "Rerun with the same settings to continue it, or choose another --out.",
                path=run_dir,
            )
        if execution is not None and record.get("execution") != execution:
            atomic_write_json(manifest, {**record, "execution": json.loads(json.dumps(execution, default=str))})
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DataError(f"{run_dir} is not empty and is not an r3v train run (no run.json); choose another --out",
                        path=run_dir)
    record = run_manifest(normalized)
    if execution is not None:
        record["execution"] = json.loads(json.dumps(execution, default=str))
    atomic_write_json(manifest, record)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_task(config: LoopConfig) -> Any:
    """The configured task; ``skip_bad`` / ``allow_outside_paths`` go to tasks whose constructor takes them."""
    from r3v.tasks.base import build_task as build

    return build(config.task, config.task_args, skip_bad=config.skip_bad, allow_outside_paths=config.allow_outside_paths)


def run_loop(config: LoopConfig, out_dir: str | Path, log: Callable[[str], None] = print,
             progress: Progress = _quiet, task: Any = None) -> list[dict[str, Any]]:
    """Run (or resume) ``config`` in ``out_dir``; returns one metrics row per iteration."""
    return Loop(config, out_dir, log=log, progress=progress, task=task).run()
