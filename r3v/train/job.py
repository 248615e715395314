"""Training jobs: one training step, complete, in a file (``iter{k}/train_job.yaml``), and the three
ways to run one: in this process (``run_job``), in a process of its own or under ``accelerate
launch`` (``launch_job``), or elsewhere while this process waits (``wait_for_job``).

``python -m r3v.train --job FILE`` runs a job (also under ``accelerate launch``); ``python -m
r3v.train --model M --items I --out O`` writes one from options, then runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from r3v.config import TrainConfig, parse_override
from r3v.errors import DataError
from r3v.io import atomic_write_json, atomic_write_text, scoped_environ
from r3v.models.presets import PRESETS, named_preset
from r3v.records import Example, TrainItem
from r3v.train.trainer import (
    DONE_FILE,
    NonFiniteLossError,
    TrainResult,
    _fingerprints,
    _read_json,
    train,
)

log = logging.getLogger("r3v.train")


JOB_FILE = "train_job.yaml"
ERROR_FILE = "r3v_train_error.json"


@dataclass
class ExampleSource:
    """The task split whose examples supply a job's images (items without their own image paths)."""

    task: str
    split: str = "train"
    data_dir: str | None = None
    limit: int | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    allow_outside_paths: bool = False

    def load(self, wanted: set[str]) -> dict[str, Example]:
        from r3v.tasks.base import build_task

        task = build_task(self.task, self.task_args, skip_bad=self.skip_bad, allow_outside_paths=self.allow_outside_paths)
        return {ex.id: ex for ex in task.load(self.split, data_dir=self.data_dir, limit=self.limit) if ex.id in wanted}


@dataclass
class TrainJob:
    """One training step, complete: what ``python -m r3v.train --job FILE`` runs, also by hand and
    under ``accelerate launch``. ``r3v train`` writes one per iteration (``iter{k}/train_job.yaml``).

    ``items``, ``out`` and ``tracking_dir`` are paths relative to the job file's folder; ``model``
    and ``init_adapter`` are too when they name a folder there, else a hub id or an absolute path.
    """

    model: str
    items: str
    out: str
    config: TrainConfig
    init_adapter: str | None = None
    examples: ExampleSource | None = None
    resume: bool = True
    #: Where trackers write (TensorBoard event files, wandb's folder); None: the trackers' defaults.
    tracking_dir: str | None = None
    #: The name trackers give this step's run (e.g. ``<run>/iter1``).
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train job") -> TrainJob:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        missing = {"model", "items", "out", "config"} - set(data)
        if unknown or missing:
            problems = [f"unknown key(s) {sorted(unknown)}" if unknown else "", f"missing key(s) {sorted(missing)}" if missing else ""]
            raise DataError(" and ".join(p for p in problems if p), path=where)
        data = dict(data)
        try:
            data["config"] = TrainConfig.from_dict(data["config"])
            if data.get("examples") is not None:
                data["examples"] = ExampleSource(**data["examples"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"bad training settings: {exc}", path=where) from exc
        return cls(**data)

    def write(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        text = "# One R3V training step: python -m r3v.train --job THIS_FILE (also under accelerate launch)\n"
        atomic_write_text(path, text + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path

    @classmethod
    def read(cls, path: str | Path) -> TrainJob:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"training job not found: {path}", path=path) from exc
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"not a readable YAML training job: {exc}", path=path) from exc
        if not isinstance(data, dict):
            raise DataError("a training job is a YAML mapping", path=path)
        return cls.from_dict(data, where=str(path))


def job_reference(value: str | None, folder: Path) -> str | None:
    """How a job file names a model or adapter: relative to the job's folder when the folder holds
    it (the run directory can move), absolute for other local folders, hub ids as they are."""
    if value is None or not Path(value).exists():
        return value
    target = Path(value).resolve()
    if target.is_relative_to(folder.resolve().parent):
        return os.path.relpath(target, folder.resolve())
    return str(target)


def _resolve(value: str | None, folder: Path) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    local = folder / value
    return str(local) if local.exists() else value


def run_job(job_path: str | Path, examples: dict[str, Example] | None = None,
            callbacks: Sequence[TrainerCallback] | None = None) -> TrainResult:
    """Run a training job in this process (every process of an ``accelerate launch`` calls this).

    ``examples`` may be passed when the caller holds them already; else they load from the job's
    example source.
    """
    from r3v.records import read_jsonl

    job_path = Path(job_path)
    job = TrainJob.read(job_path)
    folder = job_path.parent
    items_path = folder / job.items
    items = []
    for number, record in enumerate(read_jsonl(items_path), start=1):
        try:
            items.append(TrainItem.from_dict(record))
        except DataError as exc:
            raise DataError(exc.problem, path=items_path, record=f"line {number}") from exc
    if examples is None:
        wanted = {item.example_id for item in items if item.images is None}
        examples = job.examples.load(wanted) if job.examples is not None and wanted else {}
    with _tracking_environment(job, folder):
        return train(_resolve(job.model, folder), items, examples, job.config, folder / job.out, resume=job.resume,
                     init_adapter=_resolve(job.init_adapter, folder), callbacks=callbacks)


@contextlib.contextmanager
def _tracking_environment(job: TrainJob, folder: Path) -> Iterator[None]:
    """Point the Trainer's trackers at the job's tracking folder for the duration of the call."""
    if not job.tracking_dir or not job.config.report_to:
        yield
        return
    where = folder / job.tracking_dir
    settings = {"TENSORBOARD_LOGGING_DIR": str(where / "tensorboard" / (job.run_name or "train")),
                "WANDB_DIR": str(where)}
    if job.run_name:
        settings |= {"WANDB_NAME": job.run_name, "WANDB_RUN_GROUP": job.run_name.split("/")[0]}
    # a user's own wandb settings win; the TensorBoard folder is the job's
    chosen = {key: value for key, value in settings.items() if key not in os.environ or key.startswith("TENSORBOARD")}
    with scoped_environ(chosen):
        yield


class TrainingProcessError(RuntimeError):
    """The training process failed in a way it did not report as bad input or a non-finite loss."""


def launch_job(job_path: str | Path, num_processes: int = 1, accelerate_config: str | None = None,
               log_path: str | Path | None = None, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Run a training job in a process of its own (``accelerate launch`` for several processes or an
    accelerate config), so that every byte it allocated is returned when it exits.

    Its output goes to ``log_path`` and, line by line, to ``echo``. A DataError or
    NonFiniteLossError in the job is raised here again, with the job's own message.
    """
    import subprocess
    import sys

    job_path = Path(job_path).resolve()
    job = TrainJob.read(job_path)
    out = job_path.parent / job.out
    (out / ERROR_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "r3v.train", "--job", str(job_path)]
    env = dict(os.environ)
    if num_processes > 1 or accelerate_config:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                  "--main_process_port", str(_free_port())]
        if accelerate_config:
            launch += ["--config_file", str(accelerate_config)]
        elif num_processes > 1:
            launch += ["--multi_gpu"]
        if not torch.cuda.is_available():
            # accelerate's multi-process launcher runs on CPUs (gloo) when told to
            launch += ["--mixed_precision", "no"]
            env["ACCELERATE_USE_CPU"] = "true"
        command = launch + command[1:]
    log_file = Path(log_path) if log_path else out / "train_process.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with log_file.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            tail = (tail + [line.rstrip()])[-20:]
            if echo:
                echo(line.rstrip())
        code = process.wait()
    error = _read_json(out / ERROR_FILE)
    if error:
        if error.get("type") == "NonFiniteLossError":
            raise NonFiniteLossError(error["message"], step=error.get("step", 0), last_checkpoint=error.get("last_checkpoint"))
        raise DataError(error["message"])
    if code != 0:
        shown = "\n".join(tail[-8:])
        raise TrainingProcessError(f"the training process exited with code {code}; log: {log_file}\n{shown}")
    done = _read_json(out / DONE_FILE)
    if not done:
        raise TrainingProcessError(f"the training process exited without a result in {out}; log: {log_file}")
    return TrainResult.from_dict(done["result"])


def wait_for_job(job_path: str | Path, echo: Callable[[str], None] | None = None,
                 poll_seconds: float = 10.0) -> TrainResult:
    """Wait until someone else runs the job (e.g. ``accelerate launch`` on every node of a cluster)
    and return its result: the finished job must be this job, same model, items and settings."""
    from r3v.records import read_jsonl

    job_path = Path(job_path).resolve()
    job = TrainJob.read(job_path)
    folder = job_path.parent
    items = [TrainItem.from_dict(record) for record in read_jsonl(folder / job.items)]
    _, run_key = _fingerprints(_resolve(job.model, folder), items, job.config, _resolve(job.init_adapter, folder))
    out = folder / job.out
    if echo:
        echo(f"waiting for this training job to be run elsewhere (on every node):\n"
             f"  accelerate launch --num_machines N --machine_rank R ... -m r3v.train --job {job_path}")
    while True:
        done = _read_json(out / DONE_FILE)
        if done and done.get("run_key") == run_key and Path(done["result"]["output_path"]).exists():
            return TrainResult.from_dict(done["result"])
        error = _read_json(out / ERROR_FILE)
        if error:
            raise DataError(f"the training job failed where it ran: {error['message']}", path=job_path)
        time.sleep(poll_seconds)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    """Train on a JSONL file of TrainItems, or run a job file: ``python -m r3v.train`` (works under
    ``accelerate launch``)."""
    import click

    @click.command()
    @click.option("--job", "job_path", default=None, type=click.Path(dir_okay=False),
                  help="A training job file (iter{k}/train_job.yaml of an r3v train run); the other options are ignored.")
    @click.option("--model", default=None, help="Hub id, local folder or built-in name.")
    @click.option("--items", "items_path", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="JSONL of TrainItem records (kind, example_id, prompt, target, images).")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
    @click.option("--task", "task_name", default=None, help="Task whose examples supply the items' images.")
    @click.option("--split", default="train", show_default=True)
    @click.option("--data-dir", default=None, type=click.Path(file_okay=False))
    @click.option("--preset", type=click.Choice(["auto", *PRESETS]),
                  default="auto", show_default=True, help="Starting settings; auto: tiny or the model's R3V reference.")
    @click.option("--set", "settings", multiple=True, help="Override a TrainConfig field: key=value (JSON value).")
    @click.option("--init-adapter", default=None, help="Start from this LoRA adapter.")
    @click.option("--no-resume", is_flag=True, help="Discard checkpoints in --out and start over.")
    def command(job_path, model, items_path, out_dir, task_name, split, data_dir, preset, settings, init_adapter, no_resume):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if job_path is None:
            if not (model and items_path and out_dir):
                raise click.UsageError("give --job FILE, or --model, --items and --out")
            config = named_preset(preset, model)
            try:
                pairs = [parse_override(text) for text in settings]
                config = TrainConfig.from_dict({**config.to_dict(), **{".".join(path): value for path, value in pairs}})
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--set") from exc
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            examples = ExampleSource(task_name, split, data_dir) if task_name else None
            job = TrainJob(model=str(Path(model).resolve()) if Path(model).exists() else model,
                           items=str(Path(items_path).resolve()), out=".", config=config,
                           init_adapter=str(Path(init_adapter).resolve()) if init_adapter else None,
                           examples=examples, resume=not no_resume)
            job_path = job.write(out / JOB_FILE)
        job_file = Path(job_path)
        try:
            result = run_job(job_file)
        except (DataError, NonFiniteLossError) as exc:
            _record_error(job_file, exc)
            raise click.ClickException(str(exc)) from exc
        from accelerate import PartialState

        if PartialState().is_main_process:
            click.echo(json.dumps(result.to_dict(), indent=2))

    command.main(args=list(argv) if argv is not None else None, prog_name="python -m r3v.train")


def _record_error(job_file: Path, exc: Exception) -> None:
    """Leave the error where ``launch_job`` looks for it, so the parent can name it exactly."""
    from accelerate import PartialState

    try:
        job = TrainJob.read(job_file)
    except DataError:
        return
    if not PartialState().is_main_process:
        return
    record = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, NonFiniteLossError):
        record |= {"message": exc.args[0], "step": exc.step, "last_checkpoint": exc.last_checkpoint}
    atomic_write_json(job_file.parent / job.out / ERROR_FILE, record)


