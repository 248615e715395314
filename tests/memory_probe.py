"""Run ``r3v train`` in this fresh process and count the model parameters alive in it around each
training step: ``python tests/memory_probe.py RESULT.json <r3v train arguments>``.

The counts are taken right before and right after every call of ``r3v.train.run_job`` (training
inline) and ``r3v.train.launch_job`` (training in a process of its own), after a garbage
collection, and once more when the command ends. The real functions run; this only looks.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

import r3v.train as training
from r3v.cli import main

counts: dict[str, list[int]] = {}


def live_parameters() -> int:
    gc.collect()
    return sum(isinstance(obj, torch.nn.Parameter) for obj in gc.get_objects())


def watched(name: str, call):
    def wrapper(*args, **kwargs):
        counts.setdefault(f"{name} before", []).append(live_parameters())
        result = call(*args, **kwargs)
        counts.setdefault(f"{name} after", []).append(live_parameters())
        return result

    return wrapper


training.run_job = watched("run_job", training.run_job)
training.launch_job = watched("launch_job", training.launch_job)
main(sys.argv[2:], standalone_mode=False)
counts["at exit"] = [live_parameters()]
with open(sys.argv[1], "w", encoding="utf-8") as handle:
    json.dump(counts, handle)
