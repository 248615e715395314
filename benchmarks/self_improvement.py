"""Does R3V improve the built-in model? Training arms and test-time selection, side by side.

Runs ``r3v train --iterations N`` with the README's defaults for each arm (r3v, star, --no-refine,
--no-select) and each seed, then ``r3v bench`` on every arm's final model with the ladder
N = 1, 3, 5, 7 for first, majority, self-select and oracle. Everything goes through the same CLI
a user runs. Results go to benchmarks/results/self_improvement.json, a plot beside it, and a
markdown table into benchmarks/README.md (between the self-improvement markers).

    python benchmarks/self_improvement.py --seeds 0,1,2 --jobs 2   # as recorded: about 40 min on 2 cores
    python benchmarks/self_improvement.py                          # seed 0 only

A rerun reuses finished arms in --run-root (each arm's loop resumes), so only new work runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, load_average  # noqa: E402
from benchmarks.report import update_readme_section  # noqa: E402

ARMS = {"r3v": [], "star": ["--method", "star"], "no-refine": ["--no-refine"], "no-select": ["--no-select"]}
LADDER = (1, 3, 5, 7)
MARK_BEGIN, MARK_END = "<!-- self-improvement:begin -->", "<!-- self-improvement:end -->"


def r3v(*args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "r3v.cli", *args]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def run_arm(arm: str, seed: int, iterations: int, run_root: Path, threads: int | None = None) -> dict:
    run_dir = run_root / f"seed{seed}" / arm
    started = time.perf_counter()
    r3v("train", "--iterations", str(iterations), "--seed", str(seed), "--out", str(run_dir), *ARMS[arm],
        threads=threads)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = json.loads((run_dir / f"iter{iterations}" / "model.json").read_text())["ref"]
    model = [str(run_dir / ref["model"]) if ref["model_in_run"] else ref["model"]]
    if ref.get("adapter"):
        model += ["--adapter", str(run_dir / ref["adapter"])]
    bench = json.loads(
        r3v("bench", "--model", *model, "--task", "clevr-synth", "--n", str(max(LADDER)),
            "--n-ladder", ",".join(map(str, LADDER)), "--selector", "self-select", "--seed", str(seed),
            "--max-new-tokens", "64", "--json", "--out", str(run_dir / "bench"), threads=threads).stdout
    )
    timing = json.loads((run_dir / "timing.json").read_text())
    return {
        # Phase time recorded by the loop itself: a rerun that resumes a finished arm keeps it.
        "seconds": round(timing["seconds"], 1),
        "this_call_seconds": round(seconds, 1),
        "phase_seconds": timing["total"],
        "iterations": [
            {**{key: row.get(key) for key in ("iteration", "test_accuracy", "select_accuracy", "majority_accuracy",
                                              "pass_at_n", "train_samples", "items", "train_losses", "select_how")},
             **faithfulness(run_dir / f"iter{row['iteration']}")}
            for row in rows
        ],
        "ladder": bench["ladder"],
        "bench_counts": bench.get("counts"),
    }


COUNT_STEP = re.compile(r"There are (\d+) (\w+)")


@functools.cache
def gold_count_steps(split: str, task_args_json: str) -> dict[str, list[tuple[str, str]]]:
    """The teacher's counting steps per question of a split; built once per dataset, since every
    arm, seed and iteration reads the same ones."""
    from r3v.tasks.clevr_synth import ClevrSynth

    task = ClevrSynth(**json.loads(task_args_json))
    return {ex.id: COUNT_STEP.findall(ex.metadata["rationale"]) for ex in task.load(split)}


def faithfulness(iteration_dir: Path, task_args: dict | None = None) -> dict:
    """How often a rationale's counting steps ("There are N objects", ...) are all right, and how often
    its equation holds: over the iteration's greedy test answers, and over its positives (the train
    samples, drawn by the previous iteration's model, whose final answer is right). The final-answer
    check cannot see these steps."""
    from r3v.builders import equations_hold, written_equations

    def shares(path: Path, split: str, only_correct: bool) -> tuple[float | None, float | None]:
        if not path.exists():
            return None, None
        steps = gold_count_steps(split, json.dumps(task_args or {}, sort_keys=True))
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["correct"] or not only_correct]
        if not rows:
            return None, None
        counted = sum(COUNT_STEP.findall(r["text"])[: len(steps[r["example_id"]])] == steps[r["example_id"]] for r in rows)
        computed = sum(bool(written_equations(r["text"])) and equations_hold(r["text"]) for r in rows)
        return round(counted / len(rows), 4), round(computed / len(rows), 4)

    test_counts, test_equations = shares(iteration_dir / "eval" / "greedy.jsonl", "test", only_correct=False)
    positive_counts, positive_equations = shares(iteration_dir / "samples.jsonl", "train", only_correct=True)
    return {"test_rationales_faithful": test_counts, "positives_faithful": positive_counts,
            "test_equations_right": test_equations, "positives_equations_right": positive_equations}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(results: dict, iterations: int) -> dict:
    def acc(arm: str, it: int, key: str) -> float:
        return mean([seed_result[arm]["iterations"][it][key] for seed_result in results.values()
                     if seed_result[arm]["iterations"][it].get(key) is not None])

    def ladder(arm: str, k: int, metric: str) -> float:
        """``metric`` is first, maj, sel or pass; the bench JSON names them e.g. ``sel@3``."""
        return mean([seed_result[arm]["ladder"][str(k)][f"{metric}@{k}"] for seed_result in results.values()])

    r3v_start, r3v_end = acc("r3v", 0, "test_accuracy"), acc("r3v", iterations, "test_accuracy")
    relative = (r3v_end - r3v_start) / r3v_start if r3v_start else float("inf") if r3v_end > 0 else 0.0
    targets = {
        "r3v_relative_gain_over_iteration0": {"value": relative, "target": ">= 0.23", "met": relative >= 0.23},
        "r3v_minus_star_at_last_iteration": {
            "value": r3v_end - acc("star", iterations, "test_accuracy"), "target": "> 0",
            "met": r3v_end > acc("star", iterations, "test_accuracy"),
        },
        "select_minus_majority_at_n3": {
            "value": ladder("r3v", 3, "sel") - ladder("r3v", 3, "maj"), "target": "> 0",
            "met": ladder("r3v", 3, "sel") > ladder("r3v", 3, "maj"),
        },
    }
    table = {arm: [acc(arm, it, "test_accuracy") for it in range(iterations + 1)] for arm in ARMS}
    faithful = {key: [acc("r3v", it, key) for it in range(iterations + 1)]
                for key in ("test_rationales_faithful", "positives_faithful", "test_equations_right",
                            "positives_equations_right")}
    by_seed = {arm: {seed: [row["test_accuracy"] for row in seed_result[arm]["iterations"]]
                     for seed, seed_result in results.items()} for arm in ARMS}
    return {"test_accuracy_by_iteration": table, "test_accuracy_by_seed": by_seed, "r3v_faithfulness": faithful,
            "targets": targets,
            "ladder_r3v": {k: {m: ladder("r3v", k, m) for m in ("first", "maj", "sel", "pass")} for k in LADDER}}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, values in summary["test_accuracy_by_iteration"].items():
        left.plot(range(len(values)), values, marker="o", label=arm)
    left.set(xlabel="iteration", ylabel="Test@1 (greedy)", title="clevr-synth: training arms",
             xticks=range(len(next(iter(summary["test_accuracy_by_iteration"].values())))))
    left.legend()
    ks = sorted(summary["ladder_r3v"], key=int)
    names = {"first": "first (Test@1)", "maj": "majority", "sel": "self-select", "pass": "pass@N (oracle)"}
    for metric, label in names.items():
        right.plot([int(k) for k in ks], [summary["ladder_r3v"][k][metric] for k in ks], marker="o", label=label)
    right.set(xlabel="N (samples per question)", ylabel="accuracy", title="R3V final model: selection",
              xticks=[int(k) for k in ks])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary: dict, machine: dict, seeds: list[int], seconds: dict, jobs: int) -> str:
    table = summary["test_accuracy_by_iteration"]
    iterations = len(next(iter(table.values())))
    lines = [MARK_BEGIN, "## Self-improvement on the built-in task", "",
             f"`python benchmarks/self_improvement.py --seeds {','.join(map(str, seeds))} --jobs {jobs}` (written "
             f"{machine['date']} on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}). "
             f"Each arm is `r3v train --iterations 3` with the README defaults ({jobs} arm(s) at a time); "
             "numbers are Test@1 (greedy) on clevr-synth's 200 test questions.", "",
             "| arm | " + " | ".join(f"iter {i}" for i in range(iterations)) + " | wall time (s) |",
             "| --- |" + " --- |" * (iterations + 1)]
    for arm, values in table.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {seconds[arm]:.0f} |")
    if len(seeds) > 1:
        lines += ["", "The same, seed by seed (iterations 0 to 3; the table above is their mean):", "",
                  "| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
        for arm, per_seed in summary["test_accuracy_by_seed"].items():
            cells = [" → ".join(f"{v:.3f}" for v in per_seed[str(seed)]) for seed in seeds]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    faithful = summary["r3v_faithfulness"]
    fmt = lambda v: "-" if v != v else f"{v:.3f}"  # noqa: E731  (nan: not measured at that iteration)
    lines += ["", "Rationales whose counting steps are all right, and whose equation (`7 - 3 = 4`) is right (r3v arm, "
              "mean over seeds): the iteration's greedy test answers, and the positives it trains on (train samples "
              "with a right final answer, drawn by the previous iteration's model):", "",
              "| | " + " | ".join(f"iter {i}" for i in range(iterations)) + " |", "| --- |" + " --- |" * iterations,
              "| test answers: counts right | " + " | ".join(fmt(v) for v in faithful["test_rationales_faithful"]) + " |",
              "| positives: counts right | " + " | ".join(fmt(v) for v in faithful["positives_faithful"]) + " |",
              "| test answers: equation right | " + " | ".join(fmt(v) for v in faithful["test_equations_right"]) + " |",
              "| positives: equation right | " + " | ".join(fmt(v) for v in faithful["positives_equations_right"]) + " |"]
    lines += ["", "Test-time selection with the final R3V model (same samples for every selector):", "",
              "| N | first | majority | self-select | pass@N |", "| --- | --- | --- | --- | --- |"]
    for k, row in sorted(summary["ladder_r3v"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {row['first']:.3f} | {row['maj']:.3f} | {row['sel']:.3f} | {row['pass']:.3f} |")
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for name, target in summary["targets"].items():
        lines.append(f"| {name} ({target['target']}) | {target['value']:+.3f} | {'yes' if target['met'] else 'no'} |")
    lines += ["", "![self-improvement](results/self_improvement.png)", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "self_improvement"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "self_improvement.json"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="Arms run in parallel, one torch thread each (wall times then include sharing the CPU).")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    load_at_start = load_average()
    results: dict = {str(seed): {} for seed in seeds}
    jobs = [(seed, arm) for seed in seeds for arm in arms]
    threads = 1 if args.jobs > 1 else None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_arm, job[1], job[0], args.iterations, Path(args.run_root), threads)
                   for job in jobs}
        for (seed, arm), future in futures.items():
            results[str(seed)][arm] = future.result()
            accuracies = [r["test_accuracy"] for r in results[str(seed)][arm]["iterations"]]
            print(f"seed {seed}, arm {arm}: Test@1 by iteration {accuracies}", flush=True)
    summary = summarize(results, args.iterations)
    machine = describe_machine(load_at_start)
    seconds = {arm: mean([results[str(s)][arm]["seconds"] for s in seeds]) for arm in arms}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "self_improvement", "machine": machine, "seeds": seeds,
                               "iterations": args.iterations, "jobs": args.jobs, "summary": summary,
                               "runs": results}, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    update_readme_section(markdown(summary, machine, seeds, seconds, args.jobs), MARK_BEGIN, MARK_END)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
