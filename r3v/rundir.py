"""A run directory's own records: what the run is (``run.json``), one metrics line per finished
iteration (``metrics.jsonl``), and what each phase of each iteration cost (``timing.json``,
``resources.json``). Every write is atomic or append-once, so a killed run resumes cleanly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl_tail
from r3v.manifest import run_manifest
from r3v.meter import PhaseMeter, merge

#: The phases timed per iteration. Sampling excludes the answer scoring done while sampling.
PHASES = ("loading", "sampling", "scoring", "building", "training", "evaluation")
METRICS_FILE = "metrics.jsonl"
RESOURCES_FILE = "resources.json"


def iter_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"iter{k}"


def check_run_dir(
    run_dir: Path,
    settings: dict[str, Any],
    execution: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Write run.json for a new run; for an existing one, refuse settings that differ.

    ``execution`` records how the run is executed (backend engine options, training processes):
    it may change between a run and its continuation, so it is written (as of the latest start) but
    never compared. ``defaults`` are the settings of a default run: a setting that a run written by
    an older r3v lacks matches when it still has its default (the behaviour that run had).
    """
    normalized = json.loads(json.dumps(settings, default=str))
    manifest = run_dir / "run.json"
    if manifest.exists():
        record = json.loads(manifest.read_text())
        stored = record.get("settings", {})
        diffs = _differences(stored, normalized, json.loads(json.dumps(defaults or {}, default=str)))
        if diffs:
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


def _differences(stored: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting that differs; one the stored run lacks is no difference
    while it has its default value."""
    if stored == current:
        return []
    before, after, baseline = _flatten(stored), _flatten(current), _flatten(defaults)
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
            and not (key not in before and key in baseline and after[key] == baseline[key])]


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------- metrics.jsonl

def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    repair_jsonl_tail(path)
    return [record for _, record in iter_jsonl(path)]


def metrics_row(run_dir: Path, k: int) -> dict[str, Any] | None:
    return next((row for row in metrics_rows(run_dir) if row.get("iteration") == k), None)


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    if metrics_row(run_dir, row["iteration"]) is not None:
        return  # a rerun must not log an iteration twice
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        append_jsonl(handle, [row])


# ---------------------------------------------------------------- timing and resources

def timing(run_dir: Path, k: int) -> dict[str, float]:
    path = iter_dir(run_dir, k) / "timing.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    return {phase: round(stored.get(phase, 0.0), 3) for phase in PHASES}


def add_time(run_dir: Path, k: int, phase: str, seconds: float) -> None:
    """Add seconds to a phase of iteration k; work of a killed run that was redone counts once."""
    current = timing(run_dir, k)
    current[phase] = current.get(phase, 0.0) + seconds
    atomic_write_json(iter_dir(run_dir, k) / "timing.json", current)


def add_resources(run_dir: Path, k: int, phase: str, record: dict[str, Any]) -> None:
    """Fold a phase's measurement into resources.json (seconds, tokens, peak memory)."""
    path = run_dir / RESOURCES_FILE
    data = json.loads(path.read_text()) if path.exists() else {"iterations": {}}
    phases = data["iterations"].setdefault(str(k), {})
    phases[phase] = merge(phases.get(phase, {}), record)
    data["device"] = _device_label()
    atomic_write_json(path, data)


@contextmanager
def measured_phase(run_dir: Path, k: int, name: str) -> Iterator[dict[str, Any]]:
    """Time and measure one phase of iteration k. The caller may set ``tokens`` (work done),
    ``prompt_tokens`` and ``child`` (peaks a process of its own reported) in the dict it gets, and
    ``unmeasured`` seconds (spent inside the phase on other work, e.g. scoring while sampling)."""
    measured: dict[str, Any] = {"tokens": 0, "prompt_tokens": 0, "child": None, "unmeasured": 0.0}
    meter = PhaseMeter()
    try:
        with meter:
            yield measured
    finally:
        meter.seconds -= measured["unmeasured"]
        add_time(run_dir, k, name, meter.seconds)
        add_resources(run_dir, k, name, meter.record(measured["tokens"], measured["child"], measured["prompt_tokens"]))


def write_timing_summary(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/timing.json: seconds per phase, per iteration and in total."""
    # every iteration on disk, also those past a smaller --iterations given on a rerun
    done = sorted(int(p.parent.name[4:]) for p in run_dir.glob("iter*/timing.json") if p.parent.name[4:].isdigit())
    per_iteration = {str(k): timing(run_dir, k) for k in done}
    total = {phase: round(sum(t[phase] for t in per_iteration.values()), 3) for phase in PHASES}
    summary = {"iterations": per_iteration, "total": total, "seconds": round(sum(total.values()), 3)}
    if per_iteration:
        atomic_write_json(run_dir / "timing.json", summary)
    return summary


def _device_label() -> str:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return "cpu"


def results_dir(kind: str, identity: dict[str, Any], settings: dict[str, Any], tag: str = "",
                root: str | Path = "runs") -> Path:
    """``runs/<kind>-<task>-<model basename>/<split>-<tag>-<limit>-<hash of the settings>``, the
    default folder of a bench or probe run: a rerun of the same command finds its earlier work,
    and a changed setting writes beside it instead of over it."""
    model = Path(str(identity["model"]).rstrip("/")).name
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    limit = identity.get("limit")
    parts = [identity["split"], tag, "all" if limit is None else f"limit{limit}", digest]
    return Path(root) / f"{kind}-{identity['task']}-{model}" / "-".join(part for part in parts if part)
