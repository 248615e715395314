"""Experiment tracking for ``r3v train --report-to tensorboard,wandb,...``.

Each training step reports through the transformers Trainer's own integrations (``report_to``),
pointed at ``RUN_DIR/tracking`` by its job. The loop adds its own run, ``loop``, in the same
place, with one point per iteration: Test@1, sel@N, maj@N, pass@N, the train split's pass@N, the
items of each kind and the loss of each objective. It uses accelerate's tracker classes, so every
tracker accelerate knows works; a name the Trainer knows but accelerate does not gets the
training curves only, and the loop says so once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The loop's own run, beside the training steps' runs (``iter0``, ``iter1``, ...).
LOOP_RUN = "loop"


class LoopTracker:
    """The loop's per-iteration metrics, sent to every requested tracker accelerate supports."""

    def __init__(self, names: Sequence[str], folder: Path, group: str, settings: dict[str, Any],
                 log: Callable[[str], None] = print) -> None:
        import os

        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers: list[Any] = []
        for name in names:
            tracker_class = LOGGER_TYPE_TO_CLASS.get(name)
            if tracker_class is None:
                log(f"  note: the loop's per-iteration metrics are not sent to {name!r} (accelerate has no "
                    "tracker of that name); its training curves still are")
                continue
            if name == "tensorboard":
                tracker = tracker_class(LOOP_RUN, folder / "tensorboard")
            elif name == "wandb":
                os.environ.setdefault("WANDB_DIR", str(folder))
                tracker = tracker_class(os.environ.get("WANDB_PROJECT", "r3v"), name=f"{group}/{LOOP_RUN}", group=group)
            elif getattr(tracker_class, "requires_logging_directory", False):
                tracker = tracker_class(LOOP_RUN, folder / name)
            else:
                tracker = tracker_class(LOOP_RUN)
            tracker.start()
            try:
                tracker.store_init_configuration(_flat_scalars(settings))
            except Exception as exc:  # a tracker that cannot store every setting still gets the metrics
                log(f"  note: {name} did not take the run settings ({exc})")
            self.trackers.append(tracker)

    def log_iteration(self, row: dict[str, Any]) -> None:
        values = iteration_values(row)
        for tracker in self.trackers:
            tracker.log(values, step=row["iteration"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def iteration_values(row: dict[str, Any]) -> dict[str, float]:
    """The scalars one metrics row contributes, named ``r3v/<metric>``."""
    n = row.get("eval_samples") or 0
    values: dict[str, float] = {"r3v/test_at_1": row["test_accuracy"]}
    for key, name in (("select_accuracy", f"sel_at_{n}"), ("majority_accuracy", f"maj_at_{n}"),
                      ("pass_at_n", f"pass_at_{n}")):
        if row.get(key) is not None:
            values[f"r3v/{name}"] = row[key]
    if row.get("train_samples"):
        values["r3v/train_pass_at_n"] = row["train_samples"]["pass_at_n"]
    for kind, count in (row.get("items") or {}).items():
        values[f"r3v/items/{kind}"] = count
    for objective, loss in (row.get("train_losses") or {}).items():
        values[f"r3v/loss/{objective}"] = loss
    for what, by_kind in (row.get("over_length") or {}).items():
        values[f"r3v/over_length/{what}"] = sum(by_kind.values())
    return values


def _flat_scalars(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings as flat key -> scalar (trackers take no nested values)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = "None" if value is None else value
        else:
            out[name] = str(value)
    return out
