"""Does R3V improve the built-in model? Training arms and test-time selection, side by side, over seeds.

Runs ``r3v train --iterations N`` with the README's defaults for each arm (r3v, star, --no-refine,
--no-select) and each seed, then ``r3v bench`` on every arm's final model with the ladder
N = 1, 3, 5, 7 for first, majority, self-select and oracle, with the tokens each spends. Everything
goes through the same CLI a user runs. With ``--time-demo`` the demo itself (``r3v train
--iterations 3``, every default) runs first, alone, with torch's default threads, and its wall
time from process start to exit is recorded as the demo's time. The arms then share the CPU
(``--jobs``, ``--threads``).

Reported, from the runs' own files: Test@1 per arm and iteration as a mean over seeds with a 95%
interval (t over seeds); R3V against STaR and each ablation on the same test questions (the
per-question difference of the final greedy answers, averaged over seeds, with a 95% interval
over questions, and the per-seed differences); the share of rationales whose steps all hold by
the task's own checker (``task.check_steps``), for the greedy test answers and for the positives
trained on, per iteration; the selection ladder with tokens per question and majority vote at the
same budget; and the issue's targets, each met or missed.

    python benchmarks/self_improvement.py --seeds 0,1,2,3,4 --jobs 2 --time-demo   # as recorded
    python benchmarks/self_improvement.py                              # seed 0 only

A rerun reuses finished arms in --run-root (each arm's loop resumes), so only new work runs; the
demo's time is kept in --run-root/demo/demo_time.json from the run that measured it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, load_average  # noqa: E402
from benchmarks.report import update_readme_section  # noqa: E402
from r3v.loop import resolve_config  # noqa: E402

#: What `r3v train` runs with no options: its task, and the token limit its evaluation uses.
DEMO = resolve_config()
TASK = DEMO.task.name
MAX_NEW_TOKENS = DEMO.eval_tokens
ARMS = {"r3v": [], "star": ["--method", "star"], "no-refine": ["--no-refine"], "no-select": ["--no-select"]}
LADDER = (1, 3, 5, 7)
SELECTORS = {"first": "first", "maj": "majority", "sel": "self-select"}
MARK_BEGIN, MARK_END = "<!-- self-improvement:begin -->", "<!-- self-improvement:end -->"
#: Two-sided 95% quantiles of Student's t by degrees of freedom (a published table); past 30, the normal's.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
Z95 = 1.96


def t95(df: int) -> float:
    if df > 30:
        return Z95
    return T95[max(k for k in T95 if k <= df)]  # a smaller df's quantile is the wider, safe side


def mean_ci(values: list[float], quantile: float | None = None) -> dict:
    """Mean and 95% interval; over seeds (few values) with t, over questions with the normal."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    center = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": center, "low": None, "high": None, "n": len(values)}
    half = (quantile or t95(len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": center, "low": center - half, "high": center + half, "n": len(values)}


def r3v(*args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "r3v.cli", *args]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_arm(arm: str, seed: int, iterations: int, run_root: Path, threads: int | None = None) -> dict:
    run_dir = run_root / f"seed{seed}" / arm
    already_done = (run_dir / f"iter{iterations}" / "model.json").exists()
    started = time.perf_counter()
    r3v("train", "--iterations", str(iterations), "--seed", str(seed), "--out", str(run_dir), *ARMS[arm],
        threads=threads)
    seconds = time.perf_counter() - started
    rows = read_jsonl(run_dir / "metrics.jsonl")
    ref = json.loads((run_dir / f"iter{iterations}" / "model.json").read_text())["ref"]
    model = [str(run_dir / ref["model"]) if ref["model_in_run"] else ref["model"]]
    if ref.get("adapter"):
        model += ["--adapter", str(run_dir / ref["adapter"])]
    bench_results = run_dir / "bench" / "results.json"
    if already_done and bench_results.exists():  # the same model and settings: its results stand
        bench = json.loads(bench_results.read_text())
    else:
        bench = json.loads(
            r3v("bench", "--model", *model, "--task", TASK, "--n", str(max(LADDER)),
                "--n-ladder", ",".join(map(str, LADDER)), "--selector", "self-select", "--seed", str(seed),
                "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", "--out", str(run_dir / "bench"), threads=threads).stdout
        )
    timing = json.loads((run_dir / "timing.json").read_text())
    return {
        # Phase time recorded by the loop itself: a rerun that resumes a finished arm keeps it.
        "seconds": round(timing["seconds"], 1),
        "this_call_seconds": round(seconds, 1),
        "resumed_finished_run": already_done,
        "threads": threads,
        "phase_seconds": timing["total"],
        "iterations": [
            {**{key: row.get(key) for key in ("iteration", "test_accuracy", "select_accuracy", "majority_accuracy",
                                              "pass_at_n", "train_samples", "items", "train_losses", "select_how",
                                              "pool")},
             **step_checks(run_dir / f"iter{row['iteration']}")}
            for row in rows
        ],
        "final_greedy": {r["example_id"]: bool(r["correct"])
                         for r in read_jsonl(run_dir / f"iter{iterations}" / "eval" / "greedy.jsonl")},
        "ladder": bench["ladder"],
        "compute": bench.get("compute"),
        "bench_counts": bench.get("counts"),
    }


@functools.cache
def task_examples(split: str) -> tuple:
    """(task, its examples of ``split`` by id): built once, since every arm, seed and iteration reads them."""
    from r3v.registry import tasks

    task = tasks.get(TASK)()
    return task, {ex.id: ex for ex in task.load(split)}


def time_demo(run_root: Path) -> dict:
    """The main job alone: ``r3v train --iterations 3`` from scratch with every default, nothing
    else of this script running, timed from process start to exit (start-up included)."""
    run_dir = run_root / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    before = load_average()
    started = time.perf_counter()
    r3v("train", "--iterations", "3", "--out", str(run_dir / "run"))
    record = {"command": "r3v train --iterations 3", "seconds": round(time.perf_counter() - started, 1),
              "load_average_before": before, "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
              "test_accuracy": [json.loads(line)["test_accuracy"]
                                for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]}
    (run_dir / "demo_time.json").write_text(json.dumps(record))
    print(f"demo alone: {record['seconds']} s", flush=True)
    return record


def step_checks(iteration_dir: Path) -> dict:
    """The share of rationales whose every step holds by the task's own checker: the iteration's
    greedy test answers, and its positives (the train samples, drawn by the previous iteration's
    model, whose final answer is right). The final-answer metric cannot see these steps."""

    def share(path: Path, split: str, only_correct: bool) -> float | None:
        task, examples = task_examples(split)
        rows = [r for r in read_jsonl(path) if r["correct"] or not only_correct]
        if not rows:
            return None
        return round(sum(bool(task.check_steps(r["text"], examples[r["example_id"]])) for r in rows) / len(rows), 4)

    return {"test_steps_hold": share(iteration_dir / "eval" / "greedy.jsonl", "test", only_correct=False),
            "positives_steps_hold": share(iteration_dir / "samples.jsonl", "train", only_correct=True)}


def paired(results: dict, arm: str, seeds: list[str]) -> dict:
    """R3V minus ``arm`` on the same test questions at the last iteration: per question the
    difference of greedy correctness averaged over seeds (interval over questions), and per seed."""
    questions = sorted(results[seeds[0]]["r3v"]["final_greedy"])
    diff = [[int(results[s]["r3v"]["final_greedy"][q]) - int(results[s][arm]["final_greedy"][q]) for q in questions]
            for s in seeds]  # seed x question
    per_question = [statistics.fmean(column) for column in zip(*diff, strict=True)]
    per_seed = [statistics.fmean(row) for row in diff]
    return {"over_questions": mean_ci(per_question, quantile=Z95), "over_seeds": mean_ci(per_seed),
            "per_seed": dict(zip(seeds, per_seed, strict=True)), "questions": len(questions)}


def summarize(results: dict, iterations: int, arms: list[str]) -> dict:
    seeds = list(results)

    def per_iteration(arm: str, key: str) -> list[dict]:
        return [mean_ci([results[s][arm]["iterations"][it].get(key) for s in seeds]) for it in range(iterations + 1)]

    def ladder(k: int, metric: str) -> dict:
        return mean_ci([results[s]["r3v"]["ladder"][str(k)][f"{metric}@{k}"] for s in seeds])

    def tokens(k: int, metric: str) -> float | None:
        values = [results[s]["r3v"]["compute"][str(k)][SELECTORS[metric]]["tokens_per_question"]
                  for s in seeds if results[s]["r3v"].get("compute")]
        return statistics.fmean(values) if values else None

    table = {arm: per_iteration(arm, "test_accuracy") for arm in arms}
    steps = {key: per_iteration("r3v", key) for key in ("test_steps_hold", "positives_steps_hold")}
    comparisons = {arm: paired(results, arm, seeds) for arm in arms if arm != "r3v"}
    selection = {str(k): {**{m: ladder(k, m) for m in ("first", "maj", "sel", "pass")},
                          "tokens_per_question": {m: tokens(k, m) for m in SELECTORS}} for k in LADDER}
    # Equal compute: self-select at each k against majority vote at the largest k it can afford.
    for k in LADDER:
        budget = selection[str(k)]["tokens_per_question"]["sel"]
        affordable = [j for j in LADDER if (selection[str(j)]["tokens_per_question"]["maj"] or math.inf) <= (budget or 0)]
        selection[str(k)]["majority_at_sel_budget"] = (
            {"k": max(affordable), "accuracy": selection[str(max(affordable))]["maj"]["mean"]} if affordable else None)

    start, end = table["r3v"][0]["mean"], table["r3v"][iterations]["mean"]
    sel = [selection[str(k)]["sel"]["mean"] for k in LADDER]
    test_steps = [row["mean"] for row in steps["test_steps_hold"]]
    targets = {
        "r3v_iteration3_over_iteration0": {"value": end / start if start else None, "target": ">= 1.3x",
                                           "met": bool(start) and end / start >= 1.3},
    }
    if "star" in comparisons:
        star = comparisons["star"]["over_questions"]
        targets["r3v_minus_star"] = {"value": star["mean"], "interval": [star["low"], star["high"]],
                                     "target": ">= 0.03, paired 95% interval above 0",
                                     "met": star["mean"] >= 0.03 and star["low"] > 0}
    for arm in ("no-refine", "no-select"):
        if arm in table:
            targets[f"{arm}_below_r3v"] = {"value": end - table[arm][iterations]["mean"], "target": "> 0",
                                           "met": table[arm][iterations]["mean"] < end}
    targets["sel_rises_with_n"] = {"value": sel, "target": "sel@1 < sel@3 < sel@5 < sel@7",
                                   "met": all(a < b for a, b in zip(sel, sel[1:], strict=False))}
    sel3, maj7 = selection["3"]["sel"]["mean"], selection["7"]["maj"]["mean"]
    targets["sel3_vs_maj7"] = {"value": sel3 - maj7, "target": ">= 0", "met": sel3 >= maj7}
    targets["test_steps_hold_rises"] = {"value": test_steps, "target": "rises every iteration",
                                        "met": all(a is not None and b is not None and a < b
                                                   for a, b in zip(test_steps, test_steps[1:], strict=False))}
    return {"test_accuracy_by_iteration": {arm: [row["mean"] for row in rows] for arm, rows in table.items()},
            "test_accuracy_with_interval": table,
            "test_accuracy_by_seed": {arm: {s: [row["test_accuracy"] for row in results[s][arm]["iterations"]]
                                            for s in seeds} for arm in arms},
            "paired_vs_r3v": comparisons, "r3v_steps_hold": steps, "selection_r3v": selection, "targets": targets}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in summary["test_accuracy_with_interval"].items():
        xs = range(len(rows))
        left.plot(xs, [r["mean"] for r in rows], marker="o", label=arm)
        if rows[0]["low"] is not None:
            left.fill_between(xs, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.12)
    left.set(xlabel="iteration", ylabel="Test@1 (greedy)", title=f"{TASK}: training arms (95% interval)",
             xticks=range(len(next(iter(summary["test_accuracy_with_interval"].values())))))
    left.legend()
    selection = summary["selection_r3v"]
    for metric, label in (("first", "first"), ("maj", "majority"), ("sel", "self-select")):
        xs = [selection[str(k)]["tokens_per_question"][metric] for k in LADDER]
        if None in xs:
            xs = list(LADDER)
        right.plot(xs, [selection[str(k)][metric]["mean"] for k in LADDER], marker="o", label=label)
    right.set(xlabel="tokens per question (N = 1, 3, 5, 7)", ylabel="accuracy",
              title="R3V final model: selection at equal compute")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(ci: dict) -> str:
    if ci["mean"] is None:
        return "-"
    if ci["low"] is None:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def markdown(summary: dict, machine: dict, seeds: list[int], seconds: dict, command: str, demo: dict | None) -> str:
    table = summary["test_accuracy_with_interval"]
    iterations = len(next(iter(table.values())))
    lines = [MARK_BEGIN, "## Self-improvement on the built-in task", "",
             f"`{command}` (written "
             f"{machine['date']} on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}). "
             f"Each arm is `r3v train --iterations 3` with the README defaults; numbers are Test@1 (greedy) on "
             f"{TASK}'s test questions, mean over {len(seeds)} seed(s) with a 95% interval (t over seeds).", ""]
    if demo:
        lines += [f"The demo alone (`r3v train --iterations 3`, seed 0, nothing else running, default threads): "
                  f"{demo['seconds']:.0f} s from start to exit (load average {demo['load_average_before']:.2f} "
                  "before it started).", ""]
    lines += ["| arm | " + " | ".join(f"iter {i}" for i in range(iterations)) + " | loop time per run (s) |",
              "| --- |" + " --- |" * (iterations + 1)]
    for arm, rows in table.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(r) for r in rows) + f" | {seconds[arm]:.0f} |")
    if len(seeds) > 1:
        lines += ["", "Seed by seed (iterations 0 to 3):", "",
                  "| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
        for arm, per_seed in summary["test_accuracy_by_seed"].items():
            lines.append(f"| {arm} | " + " | ".join(" → ".join(f"{v:.3f}" for v in per_seed[str(s)]) for s in seeds) + " |")
    if summary["paired_vs_r3v"]:
        lines += ["", "R3V minus each arm at iteration 3 on the same test questions (greedy answers; 95% "
                  "interval over questions of the seed-averaged difference, and over seeds):", "",
                  "| R3V minus | over questions | over seeds |", "| --- | --- | --- |"]
        for arm, row in summary["paired_vs_r3v"].items():
            lines.append(f"| {arm} | {_cell(row['over_questions'])} | {_cell(row['over_seeds'])} |")
    steps = summary["r3v_steps_hold"]
    lines += ["", f"Rationales whose steps all hold by `{TASK}`'s checker (r3v arm): the greedy test answers, and the "
              "positives trained on (right final answers drawn by the previous iteration's model):", "",
              "| | " + " | ".join(f"iter {i}" for i in range(iterations)) + " |", "| --- |" + " --- |" * iterations,
              "| test answers | " + " | ".join(_cell(r) for r in steps["test_steps_hold"]) + " |",
              "| positives | " + " | ".join(_cell(r) for r in steps["positives_steps_hold"]) + " |"]
    lines += ["", "Test-time selection with the final R3V models (the same samples for every selector), and what "
              "each costs in tokens per question (prompt + completion, self-select's own call included):", "",
              "| N | first | majority | self-select | pass@N | tokens/q: majority | tokens/q: self-select | "
              "majority at self-select's budget |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in LADDER:
        row = summary["selection_r3v"][str(k)]
        budget = row["majority_at_sel_budget"]
        tok = row["tokens_per_question"]
        lines.append(f"| {k} | {_cell(row['first'])} | {_cell(row['maj'])} | {_cell(row['sel'])} | {_cell(row['pass'])} | "
                     f"{tok['maj']:.0f} | {tok['sel']:.0f} | "
                     + (f"{budget['accuracy']:.3f} (N = {budget['k']})" if budget else "-") + " |")
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for name, target in summary["targets"].items():
        value = target["value"]
        shown = (", ".join("-" if v is None else f"{v:.3f}" for v in value) if isinstance(value, list)
                 else "-" if value is None else f"{value:.3f}x" if target["target"].endswith("x") else f"{value:+.3f}")
        if target.get("interval") and None not in target["interval"]:
            shown += f" [{target['interval'][0]:+.3f}, {target['interval'][1]:+.3f}]"
        lines.append(f"| {name} ({target['target']}) | {shown} | {'yes' if target['met'] else 'no'} |")
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
                        help="Arms run in parallel after the demo, one torch thread each (their wall times then "
                             "include sharing the CPU).")
    parser.add_argument("--time-demo", action="store_true",
                        help="First run the demo alone (an extra run, timed; keep the machine otherwise idle).")
    parser.add_argument("--threads", type=int, default=None,
                        help="Torch threads of each run after the demo (default: 1 with --jobs > 1, else torch's own).")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    out = Path(args.out)
    load_at_start = load_average()
    results: dict = {str(seed): {} for seed in seeds}
    demo = time_demo(Path(args.run_root)) if args.time_demo else None
    if demo is None:
        record = Path(args.run_root) / "demo" / "demo_time.json"
        demo = json.loads(record.read_text()) if record.exists() else None
    jobs = [(seed, arm) for seed in seeds for arm in arms if arm not in results[str(seed)]]
    threads = args.threads or (1 if args.jobs > 1 else None)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_arm, job[1], job[0], args.iterations, Path(args.run_root), threads)
                   for job in jobs}
        for (seed, arm), future in futures.items():
            results[str(seed)][arm] = future.result()
            accuracies = [r["test_accuracy"] for r in results[str(seed)][arm]["iterations"]]
            print(f"seed {seed}, arm {arm}: Test@1 by iteration {accuracies}", flush=True)
    summary = summarize(results, args.iterations, arms)
    machine = describe_machine(load_at_start)
    seconds = {arm: statistics.fmean(results[str(s)][arm]["seconds"] for s in seeds) for arm in arms}
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/self_improvement.py", *sys.argv[1:]])
    out.write_text(json.dumps({"benchmark": "self_improvement", "task": TASK, "command": command, "machine": machine, "seeds": seeds,
                               "iterations": args.iterations, "jobs": args.jobs, "threads": threads, "demo": demo, "summary": summary,
                               "runs": results}, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    update_readme_section(markdown(summary, machine, seeds, seconds, command, demo), MARK_BEGIN, MARK_END)
    print(json.dumps(summary["targets"], indent=2))


if __name__ == "__main__":
    main()
