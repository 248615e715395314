"""Record finished `r3v train` runs on dev datasets, so that the README can quote them.

Choosing defaults must not look at clevr-synth's test split of the benchmark dataset, so candidate
settings run on other datasets of the same kind (`--task-arg seed=1`, `seed=2`, ...). This script
reads each run directory (run.json, metrics.jsonl, timing.json: all written by the loop) and writes
benchmarks/results/dev_runs.json plus a table in benchmarks/README.md (between the dev-runs markers).

    python benchmarks/dev_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine  # noqa: E402
from benchmarks.report import update_readme_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- dev-runs:begin -->", "<!-- dev-runs:end -->"


def weights_sha256(model: str) -> str | None:
    """The base model's weights, so runs on a since-rebuilt base are told apart."""
    from r3v.models.loading import resolve_model

    weights = Path(resolve_model(model)) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def read_run(run_dir: Path) -> dict:
    settings = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accuracy = [row["test_accuracy"] for row in rows]
    build = settings["settings"]["build"]
    return {
        "run": run_dir.name,
        "command": settings.get("command"),
        "task_args": settings["settings"]["task_args"],
        # explicit in run.json only when given on the command line; the warm-up QA has one item per question
        "train_questions": rows[0]["items"]["qa"],
        "test_questions": rows[0]["test_questions"],
        "epochs": settings["settings"]["train"]["epochs"],
        "objectives": [name for name, flag in (("cot", build["self_cot"]), ("refine", build["self_refine"]),
                                               ("select", build["self_select"])) if flag],
        "base_sha256": weights_sha256(settings["settings"]["model"]),
        "test_accuracy_by_iteration": accuracy,
        # over the same 3 sampled test answers per question, from iteration 1
        "self_select_accuracy_by_iteration": [row["select_accuracy"] for row in rows],
        "majority_accuracy_by_iteration": [row["majority_accuracy"] for row in rows],
        "relative_gain_last_vs_0": round((accuracy[-1] - accuracy[0]) / accuracy[0], 4) if accuracy[0] else None,
        "seconds": json.loads((run_dir / "timing.json").read_text())["seconds"],
    }


def markdown(runs: list[dict], machine: dict) -> str:
    lines = [MARK_BEGIN, "## Dev runs (choosing the demo's defaults)", "",
             f"`python benchmarks/dev_runs.py ...` (written {machine['date']}; runs on {machine['cpu']}, "
             f"{machine['cores']} cores, several at a time, so their seconds are not comparable). Datasets "
             "`--task-arg seed=1` and `seed=2` of clevr-synth, never the benchmark's test split; "
             "Test@1 (greedy) on each dataset's test questions; one standard error is about 0.033 on 200 "
             "questions and 0.015 on 1000.", "",
             "| run | dataset seed | train / test questions | epochs | objectives | base (sha256) | Test@1, iterations 0 to 3 "
             "| gain | self-select@3 / majority@3, last iteration |", "| --- |" + " --- |" * 8]
    for run in runs:
        accuracy = " → ".join(f"{value:.3f}" for value in run["test_accuracy_by_iteration"])
        gain = "-" if run["relative_gain_last_vs_0"] is None else f"{run['relative_gain_last_vs_0']:+.0%}"
        select, majority = run["self_select_accuracy_by_iteration"][-1], run["majority_accuracy_by_iteration"][-1]
        selection = "-" if select is None or majority is None else f"{select:.3f} / {majority:.3f}"
        lines.append(f"| {run['run']} | {run['task_args'].get('seed', 0)} | {run['train_questions']} / {run['test_questions']} "
                     f"| {run['epochs']:g} "
                     f"| {'+'.join(run['objectives'])} | {(run['base_sha256'] or '?')[:12]} | {accuracy} | {gain} | {selection} |")
    return "\n".join([*lines, MARK_END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dev_runs.json")
    args = parser.parse_args()
    runs = [read_run(run_dir) for run_dir in args.runs]
    machine = describe_machine()
    args.out.write_text(json.dumps({"benchmark": "dev_runs", "machine": machine, "runs": runs}, indent=2) + "\n")
    block = markdown(runs, machine)
    update_readme_section(block, MARK_BEGIN, MARK_END)
    print(block)


if __name__ == "__main__":
    main()
