"""Test-time selection benchmark: sample N answers per test question once, then compare selectors.

``run_bench`` fills a resumable sample store (OUT/samples.jsonl) with N samples per question, then
``evaluate_selection`` applies every selector to the first k samples for each k of the ladder and
scores the choices. Nothing is sampled twice: a rerun reuses the store, and every metric (maj@k,
sel@k, pass@k, ...) is computed from the same samples. The self-training loop calls
``evaluate_selection`` directly on its own test samples.

Outputs in OUT: samples.jsonl (+ its manifest), results.json, items.jsonl (one line per question:
gold answer and each selector's answer, verdict and how it was chosen), manifest.json.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3v.errors import DataError
from r3v.io import atomic_write_json
from r3v.manifest import run_manifest
from r3v.metrics import (
    DEFAULT_LADDER,
    accuracy,
    breakdown,
    group_by_example,
    how_counts,
    ladder_for,
    mean_pass_at_k,
    metric_name,
)
from r3v.records import Choice, Example, Sample, Sampling, write_jsonl
from r3v.registry import selectors
from r3v.selectors.base import ALL
from r3v.store import SampleStore, sample_examples


class MissingExtraError(RuntimeError):
    """An optional dependency (an install extra) is needed for what was asked."""


@dataclass
class BenchConfig:
    """What a bench run samples and how it selects."""

    #: Sampling settings for the N candidates; ``sampling.n`` is N and ``sampling.seed`` seeds everything.
    sampling: Sampling = field(default_factory=lambda: Sampling(n=3))
    #: The ks to report, capped at N (N itself is always reported).
    ladder: tuple[int, ...] = DEFAULT_LADDER
    #: Registered selector names to compare, in report order.
    selectors: tuple[str, ...] = ALL
    #: Token limit for a selector's own model call (self-select); None means ``sampling.max_new_tokens``.
    select_max_new_tokens: int | None = None
    #: Questions per sample-store chunk, the unit of resume.
    chunk_size: int = 32
    #: Questions per backend call (several chunks at once); None: one chunk per call.
    engine_batch: int | None = None

    def __post_init__(self) -> None:
        if self.sampling.n < 1:
            raise ValueError(f"N (samples per question) must be at least 1, got {self.sampling.n}")
        self.ladder = tuple(self.ladder)
        self.selectors = tuple(dict.fromkeys(self.selectors))


def make_selector(name: str, seed: int = 0, max_new_tokens: int = 512) -> Any:
    """Build a registered selector, passing the shared options its constructor accepts."""
    factory = selectors.get(name)
    offered = {"seed": seed, "max_new_tokens": max_new_tokens}
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in offered.items() if key in accepted})


def select_all(
    selector: Any, task: Any, examples: Sequence[Example], candidates_by_id: dict[str, list[Sample]], backend: Any
) -> list[Choice]:
    """One choice per example; selectors with ``select_many`` get all examples in one batch."""
    if hasattr(selector, "select_many"):
        return selector.select_many(task, examples, candidates_by_id, backend)
    return [selector.select(task, ex, candidates_by_id[ex.id], backend) for ex in examples]


def evaluate_selection(
    backend: Any,
    task: Any,
    examples: Sequence[Example],
    samples: Sequence[Sample],
    ks: Sequence[int] = (1, 3),
    selector_names: Sequence[str] = ALL,
    seed: int = 0,
    max_new_tokens: int = 512,
    with_items: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Apply each selector to the first k samples of each example, for each k; score everything.

    Every example needs at least ``max(ks)`` samples. Returns a JSON-ready dict:

    - ``accuracy``: selector -> accuracy at the largest k (a fraction in [0, 1]);
    - ``pass_at_k``: k -> unbiased pass@k over each example's samples;
    - ``ladder``: k -> {metric name (``first@k``, ``maj@k``, ``sel@k``, ...): accuracy, ``pass@k``};
    - ``counts``: selector -> {model, skipped, fallback, rule} at the largest k; ``counts_by_k``: k -> the
      same for each k; ``skipped`` and ``fallback``: those at the largest k, summed over selectors;
    - ``breakdown``: accuracy per selector by the task's ``breakdown_keys`` at the largest k;
    - ``items`` (only with ``with_items``): per example, gold and each selector's choice at the largest k.
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not examples:
        raise DataError("no examples to evaluate")
    groups = group_by_example(samples)
    top = ks[-1]
    for example in examples:
        have = len(groups.get(example.id, []))
        if have < top:
            raise DataError(f"example has {have} samples, selection at k={top} needs {top}", record=example.id)
    used = [groups[ex.id] for ex in examples]

    names = list(dict.fromkeys(selector_names))
    built = {name: make_selector(name, seed=seed, max_new_tokens=max_new_tokens) for name in names}
    ladder: dict[str, dict[str, float]] = {}
    counts_by_k: dict[str, dict[str, dict[str, int]]] = {}
    choices_at: dict[int, dict[str, list[Choice]]] = {}
    for k in ks:
        prefix = {ex.id: group[:k] for ex, group in zip(examples, used, strict=True)}
        choices_at[k] = {}
        for name in names:
            choices_at[k][name] = select_all(built[name], task, examples, prefix, backend)
        ladder[str(k)] = {metric_name(name, k): accuracy(choices_at[k][name]) for name in names}
        ladder[str(k)][f"pass@{k}"] = mean_pass_at_k(used, k)
        counts_by_k[str(k)] = {name: how_counts(choices_at[k][name]) for name in names}
        if log:
            log(f"k={k}: " + " · ".join(f"{metric} {value:.3f}" for metric, value in ladder[str(k)].items())
                + "".join(f" · {name}: {c['skipped']} skipped, {c['fallback']} fallback"
                          for name, c in counts_by_k[str(k)].items() if c["model"] or c["skipped"] or c["fallback"]))

    final = choices_at[top]
    results: dict[str, Any] = {
        "examples": len(examples),
        "samples": sum(len(g) for g in used),
        "n": top,
        "ks": ks,
        "selectors": names,
        "accuracy": {name: accuracy(final[name]) for name in names},
        "pass_at_k": {str(k): ladder[str(k)][f"pass@{k}"] for k in ks},
        "ladder": ladder,
        "counts": counts_by_k[str(top)],
        "counts_by_k": counts_by_k,
        "skipped": sum(c["skipped"] for c in counts_by_k[str(top)].values()),
        "fallback": sum(c["fallback"] for c in counts_by_k[str(top)].values()),
        "breakdown": breakdown(examples, final, getattr(task, "breakdown_keys", ())),
    }
    if with_items:
        results["items"] = [_item(ex, group, {name: final[name][i] for name in names})
                            for i, (ex, group) in enumerate(zip(examples, used, strict=True))]
    return results


def _item(example: Example, group: Sequence[Sample], choices: dict[str, Choice]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "example_id": example.id,
        "gold": example.answer,
        "candidates": [s.answer for s in group],
        "n_correct": sum(s.correct for s in group),
        "selectors": {},
    }
    for name, choice in choices.items():
        entry = {"answer": choice.answer, "correct": choice.correct, "how": choice.how}
        if choice.raw_output is not None:
            entry["raw_output"] = choice.raw_output
        record["selectors"][name] = entry
    return record


def store_settings(identity: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """What the sample store's manifest pins: change any of it and the store refuses to mix samples."""
    return {**identity, "prompt": "cot", "sampling": config.sampling.to_dict(), "chunk_size": config.chunk_size}


def default_out_dir(identity: dict[str, Any], config: BenchConfig, root: str | Path = "runs") -> Path:
    """``runs/bench-<task>-<model basename>/<split>-n<N>-<limit>-<hash of the sampling settings>``.

    The hash keeps runs with other sampling settings apart, so a rerun of the same command finds
    its samples and a changed one starts fresh instead of being refused.
    """
    model = Path(str(identity["model"]).rstrip("/")).name
    digest = hashlib.sha256(
        json.dumps(store_settings(identity, config), sort_keys=True, default=str).encode()
    ).hexdigest()[:8]
    limit = identity.get("limit")
    size = "all" if limit is None else f"limit{limit}"
    return Path(root) / f"bench-{identity['task']}-{model}" / f"{identity['split']}-n{config.sampling.n}-{size}-{digest}"


def run_bench(
    backend: Any,
    task: Any,
    examples: Sequence[Example],
    config: BenchConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    on_chunk: Callable[[int, int, list[Sample]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample (or reuse) N samples per example in ``out_dir``, compare the selectors, write the results.

    ``identity`` names what is benchmarked (model, adapter, backend, task, split, limit, data_dir);
    it goes into the manifests and results.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = SampleStore(out / "samples.jsonl", store_settings(identity, config))
    samples = sample_examples(
        backend, task, examples, config.sampling, store, chunk_size=config.chunk_size, on_chunk=on_chunk,
        engine_batch=config.engine_batch,
    )
    ks = ladder_for(config.sampling.n, config.ladder)
    select_tokens = config.select_max_new_tokens or config.sampling.max_new_tokens
    evaluated = evaluate_selection(
        backend, task, examples, samples, ks, config.selectors, seed=config.sampling.seed,
        max_new_tokens=select_tokens, with_items=True, log=log,
    )
    items = evaluated.pop("items")
    results = {
        **identity,
        "sampling": config.sampling.to_dict(),
        "select_max_new_tokens": select_tokens,
        **evaluated,
        "out": str(out),
    }
    write_jsonl(out / "items.jsonl", items)
    atomic_write_json(out / "results.json", results)
    atomic_write_json(
        out / "manifest.json",
        run_manifest({**store_settings(identity, config), "ladder": ks, "selectors": list(config.selectors),
                      "select_max_new_tokens": select_tokens}),
    )
    return results


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against N (the ks of the ladder), one line per selector plus unbiased pass@k."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError("plotting needs matplotlib: pip install 'r3v[plot]'") from exc

    ks = [int(k) for k in results["ks"]]
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axes = figure.add_subplot()
    for name in results["selectors"]:
        values = [results["ladder"][str(k)][metric_name(name, k)] for k in ks]
        style = {"linestyle": ":", "color": "grey"} if name == "oracle" else {}
        axes.plot(ks, values, marker="o", label=f"{name} ({metric_name(name, 'k')})", **style)
    axes.plot(ks, [results["pass_at_k"][str(k)] for k in ks], marker="x", linestyle="--",
              color="black", label="pass@k (unbiased)")
    axes.set_xlabel("N (candidates per question)")
    axes.set_ylabel("accuracy")
    axes.set_xticks(ks)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    title = f"{results.get('task', '')} · {Path(str(results.get('model', ''))).name} · {results['examples']} questions"
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
