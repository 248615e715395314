"""Record finished `r3v train` runs on dev datasets, so that the README can quote them.

Choosing defaults must not look at clevr-synth's test split of the benchmark dataset, so candidate
settings run on other datasets of the same kind (`--task-arg seed=1`, `seed=2`, ...). This script
reads each run directory (run.json, metrics.jsonl, timing.json: all written by the loop) and writes
benchmarks/results/dev_runs.json plus a table in benchmarks/README.md (between the dev-runs markers).
Runs already in the results file stay there (a run given again replaces its record).

    python benchmarks/dev_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine  # noqa: E402
from benchmarks.report import update_readme_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- dev-runs:begin -->", "<!-- dev-runs:end -->"


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


@functools.cache
def task_with_examples(task_name: str, task_args_json: str, split: str) -> tuple:
    from r3v.registry import tasks

    task = tasks.get(task_name)(**json.loads(task_args_json))
    return task, {ex.id: ex for ex in task.load(split)}


def steps_hold(iteration_dir: Path, task_name: str, task_args: dict) -> dict:
    """The share of rationales whose every step the task's own checker accepts (``check_steps``), over
    the greedy test answers and over the positives; None for a task without a checker."""

    args_json = json.dumps(task_args, sort_keys=True)
    greedy = read_samples(iteration_dir / "eval" / "greedy.jsonl")

    def share(rows: list[dict] | None, split: str, only_correct: bool) -> float | None:
        task, examples = task_with_examples(task_name, args_json, split)
        if task.check_steps is None or rows is None:
            return None
        rows = [r for r in rows if r["correct"] or not only_correct]
        return round(sum(bool(task.check_steps(r["text"], examples[r["example_id"]])) for r in rows) / len(rows), 4) if rows else None

    found = {"test_steps_hold": share(greedy, "test", only_correct=False),
             "positives_steps_hold": share(read_samples(iteration_dir / "samples.jsonl"), "train", only_correct=True)}
    return found | step_parts(greedy, *task_with_examples(task_name, args_json, "test"))


def read_samples(path: Path) -> list[dict] | None:
    """The samples of a store file, or None where the run wrote none."""
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_parts(rows: list[dict] | None, task, examples: dict) -> dict:
    """Over every step written in the greedy test answers, the share read right, marked right and
    counted right (for what the step wrote) and summed right, for a task that judges steps one by one (``step_outcomes``,
    grid-count); empty otherwise. It says which kind of step keeps a rationale from holding."""
    if not hasattr(task, "step_outcomes") or rows is None:
        return {}
    outcomes = [step for r in rows for step in task.step_outcomes(r["text"], examples[r["example_id"]]) or []]
    if not outcomes:
        return {}
    shares = {f"test_steps_{part}": round(sum(getattr(step, part) for step in outcomes) / len(outcomes), 4)
              for part in ("read", "marked", "counted", "summed")}
    # the bar for "counted": what always writing the commonest right count would score
    right_counts = Counter(step.right_count for step in outcomes if step.right_count is not None)
    shares["test_steps_commonest_count"] = round(max(right_counts.values()) / len(outcomes), 4) if right_counts else None
    return shares


def selection_ladder(results: Path) -> dict | None:
    """First sample, majority vote and self-select at each N of an ``r3v bench`` ladder."""
    if not results.exists():
        return None
    ladder = json.loads(results.read_text())["ladder"]
    return {k: {name: row[f"{name}@{k}"] for name in ("first", "maj", "sel")} for k, row in ladder.items()}


def weights_sha256(model: str) -> str | None:
    """The base model's weights, so runs on a since-rebuilt base are told apart."""
    from r3v.models.loading import resolve_model

    weights = Path(resolve_model(model)) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def read_run(run_dir: Path, model_paths: dict[str, str] | None = None) -> dict:
    """One run's record; ``model_paths`` maps a model name in run.json to the folder it meant then
    (a built-in name whose shipped weights have changed since the run)."""
    settings = json.loads((run_dir / "run.json").read_text())
    model = settings["settings"]["model"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accuracy = [row["test_accuracy"] for row in rows]
    build = settings["settings"]["build"]
    task, task_args = settings["settings"]["task"], settings["settings"]["task_args"]

    def rationale_shares(iteration: int) -> dict:
        found = steps_hold(run_dir / f"iter{iteration}", task, task_args)
        if task == "clevr-synth":
            found.update(faithfulness(run_dir / f"iter{iteration}", task_args))
        return found

    return {
        "run": run_dir.name,
        "command": settings.get("command"),
        "task": task,
        "task_args": task_args,
        # explicit in run.json only when given on the command line; the warm-up QA has one item per question
        "train_questions": rows[0]["items"]["qa"],
        "test_questions": rows[0]["test_questions"],
        "epochs": settings["settings"]["train"]["epochs"],
        "learning_rate": settings["settings"]["train"]["learning_rate"],
        "temperature": settings["settings"]["sampling"]["temperature"],
        "from_base": settings["settings"]["from_base"],
        "objectives": [name for name, flag in (("cot", build["self_cot"]), ("refine", build["self_refine"]),
                                               ("select", build["self_select"])) if flag],
        "base_sha256": weights_sha256((model_paths or {}).get(model, model)),
        # set through the Python API (BuildConfig); the CLI's defaults are True and False
        "warmup_mixed_in": build.get("include_warmup", True),
        "check_equations": build.get("check_equations", False),
        "check_steps": build.get("check_steps", False),
        "select_sizes": build.get("select_sizes", [3]),
        "select_sizes_per_question": build.get("select_sizes_per_question", 0),
        # `r3v bench --n 7 --n-ladder 1,3,5,7 --out RUN_DIR/bench` on the last model, where it was run
        "selection_ladder": selection_ladder(run_dir / "bench" / "results.json"),
        "test_accuracy_by_iteration": accuracy,
        # over the same 3 sampled test answers per question, from iteration 1
        "self_select_accuracy_by_iteration": [row["select_accuracy"] for row in rows],
        "majority_accuracy_by_iteration": [row["majority_accuracy"] for row in rows],
        "relative_gain_last_vs_0": round((accuracy[-1] - accuracy[0]) / accuracy[0], 4) if accuracy[0] else None,
        "seconds": json.loads((run_dir / "timing.json").read_text())["seconds"],
        # what the final-answer check cannot see, in the greedy test answers of the first and last iteration
        "rationales": {str(row["iteration"]): rationale_shares(row["iteration"]) for row in (rows[0], rows[-1])},
    }


def inside(run: dict, key: str) -> str:
    """A rationale share at the first and the last iteration, e.g. ``0.15 → 0.45``."""
    values = [shares.get(key) for shares in run.get("rationales", {}).values()]
    return " → ".join("-" if v is None else f"{v:.2f}" for v in values) or "-"


def markdown(runs: list[dict], machine: dict) -> str:
    lines = [MARK_BEGIN, "## Dev runs (choosing the demo's defaults)", "",
             f"`python benchmarks/dev_runs.py ...` (last written {machine['date']}; runs on {machine['cpu']}, "
             f"{machine['cores']} cores, several at a time, so their seconds are not comparable). Datasets "
             "`--task-arg seed=1` and `seed=2` of each task, never the benchmark's test split (seed 0); "
             "Test@1 (greedy) on each dataset's test questions; one standard error is about 0.033 on 200 "
             "questions, 0.027 on 300 and 0.015 on 1000. T / lr: sampling temperature and learning rate; "
             "\"continue\": each iteration trains on from the previous one's weights.", "",
             "Three columns look inside the greedy test rationales, at iteration 0 and at the last one: the share "
             "whose equation (`7 - 3 = 4`) is right and the share whose counting steps are all right "
             "(clevr-synth), and the share whose every step the task's own checker accepts (`check_steps`; "
             "recorded for the runs read since it was added).", "",
             "| run | task | dataset seed | train / test questions | epochs | T / lr | objectives | base (sha256) "
             "| Test@1, iterations 0 to 3 | gain | self-select@3 / majority@3, last iteration | equation right "
             "| counts right | all steps hold |",
             "| --- |" + " --- |" * 13]
    laddered = [run for run in runs if run.get("selection_ladder")]
    for run in runs:
        accuracy = " → ".join(f"{value:.3f}" for value in run["test_accuracy_by_iteration"])
        gain = "-" if run["relative_gain_last_vs_0"] is None else f"{run['relative_gain_last_vs_0']:+.0%}"
        select, majority = run["self_select_accuracy_by_iteration"][-1], run["majority_accuracy_by_iteration"][-1]
        selection = "-" if select is None or majority is None else f"{select:.3f} / {majority:.3f}"
        objectives = "+".join(run["objectives"])
        objectives += "" if run.get("warmup_mixed_in", True) else ", warm-up not mixed in"
        objectives += ", equation check" if run.get("check_equations") else ""
        objectives += ", step check" if run.get("check_steps") else ""
        objectives += "" if run.get("from_base", True) else ", continue"
        sizes = run.get("select_sizes", [3])
        objectives += f", select on {sizes[0]}-{sizes[-1]}" if "select" in run["objectives"] and sizes != [3] else ""
        drawn = run.get("select_sizes_per_question", 0)
        objectives += f" ({drawn} drawn per question)" if "select" in run["objectives"] and drawn else ""
        rates = f"{run['temperature']:g} / {run['learning_rate']:g}" if "temperature" in run else "-"
        lines.append(f"| {run['run']} | {run.get('task', 'clevr-synth')} | {run['task_args'].get('seed', 0)} "
                     f"| {run['train_questions']} / {run['test_questions']} | {run['epochs']:g} | {rates} "
                     f"| {objectives} | {(run['base_sha256'] or '?')[:12]} | {accuracy} | {gain} | {selection} "
                     f"| {inside(run, 'test_equations_right')} | {inside(run, 'test_rationales_faithful')} "
                     f"| {inside(run, 'test_steps_hold')} |")
    parted = [run for run in runs if any("test_steps_read" in shares for shares in run.get("rationales", {}).values())]
    if parted:
        lines += ["", "Which kind of step fails, over every step written in the greedy test rationales (iteration 0 "
                  "and the last; `step_outcomes`): the row read right, each object marked right (\"yes\" if asked "
                  "about) and the row counted right for what the step wrote, and the running total summed right "
                  "from the step's own numbers; and what always writing the commonest right count would score on "
                  "the same steps. Runs without marks were recorded before grid-count's rationales marked each "
                  "object (base weights other than the marked base's); their count was of the objects read.", "",
                  "| run | read right | marked right | counted right | always the commonest count | summed right |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {run['run']} | {inside(run, 'test_steps_read')} | {inside(run, 'test_steps_marked')} "
                  f"| {inside(run, 'test_steps_counted')} "
                  f"| {inside(run, 'test_steps_commonest_count')} | {inside(run, 'test_steps_summed')} |" for run in parted]
    if laddered:
        ks = sorted({int(k) for run in laddered for k in run["selection_ladder"]})
        lines += ["", "Test-time selection with the last model of the runs above that were benched (`r3v bench --n 7 "
                  "--n-ladder 1,3,5,7`, the same samples for every selector): self-select / majority vote, and the "
                  "first sample alone.", "",
                  "| run | first | " + " | ".join(f"N = {k}: self-select / majority" for k in ks) + " |",
                  "| --- |" + " --- |" * (len(ks) + 1)]
        for run in laddered:
            ladder = run["selection_ladder"]
            cells = [f"{ladder[str(k)]['sel']:.3f} / {ladder[str(k)]['maj']:.3f}" if str(k) in ladder else "-" for k in ks]
            lines.append(f"| {run['run']} | {ladder[str(ks[0])]['first']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, MARK_END])


def merged(kept: list[dict], new: list[dict]) -> list[dict]:
    """The recorded runs with the new ones in: a run of the same name is replaced in place."""
    by_name = {run["run"]: run for run in new}
    runs = [by_name.pop(run["run"], run) for run in kept]
    return runs + [run for run in new if run["run"] in by_name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--model-path", action="append", default=[], metavar="NAME=DIR",
                        help="Read the base weights of runs whose model is NAME from DIR (e.g. the previous "
                             "shipped r3v-clevr-base); repeatable.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dev_runs.json")
    args = parser.parse_args()
    model_paths = dict(item.split("=", 1) for item in args.model_path)
    recorded = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    runs = merged(recorded, [read_run(run_dir, model_paths) for run_dir in args.runs])
    machine = describe_machine()
    args.out.write_text(json.dumps({"benchmark": "dev_runs", "machine": machine, "runs": runs}, indent=2) + "\n")
    block = markdown(runs, machine)
    update_readme_section(block, MARK_BEGIN, MARK_END)
    print(block)


if __name__ == "__main__":
    main()
