"""The R3V trainer, as a package: ``data`` (items to batches: lengths, masks, the step layout),
``trainer`` (the loss, the Trainer subclass, ``train``), and ``job`` (a training step as a file,
and the ways to run it). ``python -m r3v.train --job FILE`` runs a job.
"""

from r3v.config import TrainConfig
from r3v.train.job import ExampleSource, TrainJob, launch_job, run_job, wait_for_job
from r3v.train.trainer import (
    CHECKPOINT_DIR,
    DONE_FILE,
    LOG_FILE,
    NonFiniteLossError,
    TrainResult,
    plan_batch,
    prepare_model,
    train,
)

__all__ = [
    "CHECKPOINT_DIR", "DONE_FILE", "LOG_FILE", "ExampleSource", "NonFiniteLossError", "TrainConfig", "TrainJob",
    "TrainResult", "launch_job", "plan_batch", "prepare_model", "run_job", "train", "wait_for_job",
]
