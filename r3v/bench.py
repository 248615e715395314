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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3v.config import SelectConfig, to_mapping
from r3v.diagnostics import answer_cost, cost_summary, equal_compute, selection_diagnostics
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
from r3v.rundir import results_dir
from r3v.selectors.base import ALL
from r3v.store import SampleStore, sample_examples

if TYPE_CHECKING:  # a type only: the task toolkit loads with the tasks
    from r3v.tasks.base import Task


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
    #: How self-select decides (skip when candidates agree; what an unreadable output counts as).
    select: SelectConfig = field(default_factory=SelectConfig)
    #: Questions per sample-store chunk, the unit of resume.
    chunk_size: int = 32
    #: Questions per backend call (several chunks at once); None: one chunk per call.
    engine_batch: int | None = None

    def __post_init__(self) -> None:
        if self.sampling.n < 1:
            raise ValueError(f"N (samples per question) must be at least 1, got {self.sampling.n}")
        self.ladder = tuple(self.ladder)
        self.selectors = tuple(dict.fromkeys(self.selectors))


def make_selector(name: str, seed: int = 0, max_new_tokens: int = 512, select: SelectConfig | None = None) -> Any:
    """Build a registered selector, passing the shared options its constructor accepts."""
    factory = selectors.get(name)
    offered = {"seed": seed, "max_new_tokens": max_new_tokens, **(select or SelectConfig()).selector_options()}
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in offered.items() if key in accepted})


def select_all(
    selector: Any, task: Task, examples: Sequence[Example], candidates_by_id: dict[str, list[Sample]], backend: Any
) -> list[Choice]:
    """One choice per example; selectors with ``select_many`` get all examples in one batch."""
    if hasattr(selector, "select_many"):
        return selector.select_many(task, examples, candidates_by_id, backend)
    return [selector.select(task, ex, candidates_by_id[ex.id], backend) for ex in examples]


def evaluate_selection(
    backend: Any,
    task: Task,
    examples: Sequence[Example],
    samples: Sequence[Sample],
    ks: Sequence[int] = (1, 3),
    selector_names: Sequence[str] = ALL,
    seed: int = 0,
    max_new_tokens: int = 512,
    with_items: bool = False,
    log: Callable[[str], None] | None = None,
    select: SelectConfig | None = None,
) -> dict[str, Any]:
    """Apply each selector to the first k samples of each example, for each k; score everything.

    Every example needs at least ``max(ks)`` samples. Returns a JSON-ready dict:

    - ``accuracy``: selector -> accuracy at the largest k (a fraction in [0, 1]);
    - ``pass_at_k``: k -> unbiased pass@k over each example's samples;
    - ``ladder``: k -> {metric name (``first@k``, ``maj@k``, ``sel@k``, ...): accuracy, ``pass@k``};
    - ``counts``: selector -> {model, skipped, fallback, unparseable, rule} at the largest k; ``counts_by_k``: k -> the
      same for each k; ``skipped`` and ``fallback``: those at the largest k, summed over selectors;
    - ``breakdown``: accuracy per selector by the task's ``breakdown_keys`` at the largest k;
    - ``compute``: k -> selector -> tokens and seconds spent, in total and per question, and the
      accuracy (``r3v.diagnostics``); ``equal_compute``: selector -> one point per k, next to
      majority vote's accuracy at the same token budget;
    - ``diagnostics``: selector -> positions picked, right-when-possible, answers when none is
      right, agreement with majority vote, at the largest k;
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
    select = select or SelectConfig()
    built = {name: make_selector(name, seed=seed, max_new_tokens=max_new_tokens, select=select) for name in names}
    ladder: dict[str, dict[str, float]] = {}
    counts_by_k: dict[str, dict[str, dict[str, int]]] = {}
    choices_at: dict[int, dict[str, list[Choice]]] = {}
    compute: dict[str, dict[str, dict[str, Any]]] = {}
    for k in ks:
        prefix = {ex.id: group[:k] for ex, group in zip(examples, used, strict=True)}
        choices_at[k] = {}
        for name in names:
            choices_at[k][name] = select_all(built[name], task, examples, prefix, backend)
        ladder[str(k)] = {metric_name(name, k): accuracy(choices_at[k][name]) for name in names}
        ladder[str(k)][f"pass@{k}"] = mean_pass_at_k(used, k)
        counts_by_k[str(k)] = {name: how_counts(choices_at[k][name]) for name in names}
        compute[str(k)] = {
            name: cost_summary([answer_cost(name, prefix[ex.id], c) for ex, c in zip(examples, choices_at[k][name], strict=True)],
                               choices_at[k][name])
            for name in names
        }
        if log:
            log(f"k={k}: " + " · ".join(f"{metric} {value:.3f}" for metric, value in ladder[str(k)].items())
                + "".join(f" · {name}: {c['skipped']} skipped, {c['fallback']} fallback, {c['unparseable']} unparseable"
                          for name, c in counts_by_k[str(k)].items()
                          if c["model"] or c["skipped"] or c["fallback"] or c["unparseable"]))

    final = choices_at[top]
    results: dict[str, Any] = {
        "examples": len(examples),
        "samples": sum(len(g) for g in used),
        "n": top,
        "ks": ks,
        "selectors": names,
        "select": to_mapping(select),
        "accuracy": {name: accuracy(final[name]) for name in names},
        "pass_at_k": {str(k): ladder[str(k)][f"pass@{k}"] for k in ks},
        "ladder": ladder,
        "counts": counts_by_k[str(top)],
        "counts_by_k": counts_by_k,
        "skipped": sum(c["skipped"] for c in counts_by_k[str(top)].values()),
        "fallback": sum(c["fallback"] for c in counts_by_k[str(top)].values()),
        "unparseable": sum(c["unparseable"] for c in counts_by_k[str(top)].values()),
        "breakdown": breakdown(examples, final, task.breakdown_keys),
        "compute": compute,
        "equal_compute": equal_compute(compute),
        "diagnostics": selection_diagnostics(
            task, examples, [group[:top] for group in used], final,
            {name: [shown_order(built[name], ex, group[:top]) for ex, group in zip(examples, used, strict=True)]
             for name in names},
        ),
    }
    if with_items:
        results["items"] = [_item(ex, group, {name: final[name][i] for name in names})
                            for i, (ex, group) in enumerate(zip(examples, used, strict=True))]
    return results


def shown_order(selector: Any, example: Example, candidates: Sequence[Sample]) -> Sequence[Sample]:
    """The candidates in the order ``selector`` showed them (self-select shuffles; the rules read
    them as stored)."""
    shuffled = getattr(selector, "shuffled", None)
    return shuffled(example, candidates) if shuffled is not None else candidates


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
            entry["select_tokens"] = {"prompt": choice.prompt_tokens, "completion": choice.completion_tokens}
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
    return results_dir("bench", identity, store_settings(identity, config), f"n{config.sampling.n}", root)


def run_bench(
    backend: Any,
    task: Task,
    examples: Sequence[Example],
    config: BenchConfig,
    out_dir: str | Path,
    identity: dict[str, Any],
    on_chunk: Callable[[int, int, list[Sample]], None] | None = None,
    log: Callable[[str], None] | None = None,
    skip_bad: bool = False,
    bad: list[str] | None = None,
) -> dict[str, Any]:
    """Sample (or reuse) N samples per example in ``out_dir``, compare the selectors, write the results.

    ``identity`` names what is benchmarked (model, adapter, backend, task, split, limit, data_dir);
    it goes into the manifests and results. With ``skip_bad`` a question whose image fails to open
    is left out (its error appended to ``bad``) instead of stopping the run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = SampleStore(out / "samples.jsonl", store_settings(identity, config))
    samples = sample_examples(
        backend, task, examples, config.sampling, store, chunk_size=config.chunk_size, on_chunk=on_chunk,
        engine_batch=config.engine_batch, skip_bad=skip_bad, bad=bad,
    )
    if skip_bad:  # questions whose images did not open have no samples: they are left out
        sampled = {s.example_id for s in samples}
        examples = [ex for ex in examples if ex.id in sampled]
    ks = ladder_for(config.sampling.n, config.ladder)
    select_tokens = config.select_max_new_tokens or config.sampling.max_new_tokens
    evaluated = evaluate_selection(
        backend, task, examples, samples, ks, config.selectors, seed=config.sampling.seed,
        max_new_tokens=select_tokens, with_items=True, log=log, select=config.select,
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
                      "select_max_new_tokens": select_tokens, "select": to_mapping(config.select)}),
    )
    return results


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against N (the ks of the ladder), one line per selector plus unbiased pass@k; and
    accuracy against the tokens each selector spent per question (equal compute)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError("plotting needs matplotlib: pip install 'r3v[plot]'") from exc

    ks = [int(k) for k in results["ks"]]
    figure = Figure(figsize=(11, 4.2), dpi=120)
    by_n, by_tokens = figure.subplots(1, 2)
    for name in results["selectors"]:
        values = [results["ladder"][str(k)][metric_name(name, k)] for k in ks]
        style = {"linestyle": ":", "color": "grey"} if name == "oracle" else {}
        line = by_n.plot(ks, values, marker="o", label=f"{name} ({metric_name(name, 'k')})", **style)[0]
        if name != "oracle":  # the upper bound spends nothing on choosing: it reads the gold
            tokens = [results["compute"][str(k)][name]["tokens_per_question"] for k in ks]
            by_tokens.plot(tokens, values, marker="o", color=line.get_color(), label=name, **style)
            for k, x, y in zip(ks, tokens, values, strict=True):
                by_tokens.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    by_n.plot(ks, [results["pass_at_k"][str(k)] for k in ks], marker="x", linestyle="--",
              color="black", label="pass@k (unbiased)")
    by_n.set_xlabel("N (candidates per question)")
    by_n.set_xticks(ks)
    by_tokens.set_xlabel("tokens per question, the selector's own call included (labels: k)")
    title = f"{results.get('task', '')} · {Path(str(results.get('model', ''))).name} · {results['examples']} questions"
    for axes, subtitle in ((by_n, "accuracy against N"), (by_tokens, "accuracy at equal compute")):
        axes.set_ylabel("accuracy")
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.set_title(f"{title}\n{subtitle}", fontsize=9)
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
