"""Record what r3v's commands produce, to show that a refactor changed no behaviour.

    python scripts/behaviour_snapshot.py --save before.json          # on the old code
    python scripts/behaviour_snapshot.py --compare before.json       # on the new code: exit 1 on any difference

It runs, each in a fresh process with one thread (so floating point is repeatable):

1. a small ``r3v train --iterations 1`` on the built-in base model (8 train, 4 test questions);
2. ``r3v bench --json`` on the built-in base model (6 questions, N = 3);
3. ``r3v score --json --out`` on prediction files for every benchmark task, built from the
   project's own fixtures (tests/fixtures).

and digests every file they write: JSON files after removing what legitimately differs between
two runs of the same code (wall-clock seconds, package versions, the command line, the date,
absolute paths), every other file by its bytes. The snapshot maps each file (and each command's
stdout) to its digest; ``--compare`` lists every file that differs, appears or disappears.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

#: JSON keys whose values depend on the machine, the clock or the environment, not on r3v's behaviour.
VOLATILE_KEYS = {
    "seconds", "timing", "versions", "python", "platform", "command", "date", "resources", "seconds_to_first_step",
    "peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib",
}
#: Files that only record time, memory or machine state.
VOLATILE_FILES = {"timing.json", "resources.json", "train_process.log"}
#: Checkpoint folders hold pickled optimizer and RNG state; the final weights are compared instead.
SKIPPED_PARTS = {"checkpoints"}

TRAIN = ["train", "--iterations", "1", "--model", "r3v-clevr-base", "--task", "clevr-synth", "--train-limit", "8",
         "--test-limit", "4", "--max-new-tokens", "32", "--epochs", "1", "--teacher-count", "8", "--chunk-size", "3",
         "--seed", "7", "--training-process", "inline"]
BENCH = ["bench", "--model", "r3v-clevr-base", "--task", "clevr-synth", "--limit", "6", "--n", "3",
         "--max-new-tokens", "24", "--n-ladder", "1,2,3", "--json"]


def score_inputs(folder: Path) -> list[tuple[str, list[str], Path]]:
    """(task, extra arguments, prediction file) for every task: the fixtures' own prediction files,
    and, for the tasks without one, predictions made from the fixtures' gold answers and rationales."""
    cases = [("m3cot", [], FIXTURES / "m3cot" / "predictions.jsonl"),
             ("miniwob", [], FIXTURES / "miniwob" / "predictions.jsonl"),
             ("geoqa", [], FIXTURES / "geoqa" / "predictions.jsonl"),
             ("geoqa", ["--task-arg", "judge=r3v"], FIXTURES / "geoqa" / "predictions.jsonl")]
    problems = json.loads((FIXTURES / "tabmwp" / "problems_test.json").read_text())
    rows = [{**problem, "pid": pid, "prediction": problem["solution"]} for pid, problem in problems.items()]
    cases.append(("tabmwp", [], _write(folder / "tabmwp.jsonl", rows)))
    charts = json.loads((FIXTURES / "chartqa" / "test" / "test_human.json").read_text())
    rows = [{**record, "prediction": f"The chart shows it.\nAnswer: {record['label']}" if i % 3 else "no idea"}
            for i, record in enumerate(charts)]
    cases.append(("chartqa", [], _write(folder / "chartqa.jsonl", rows)))
    cases.append(("chartqa", ["--task-arg", "relaxed=true"], folder / "chartqa.jsonl"))
    clevr = json.loads((FIXTURES / "clevr_math" / "r3v" / "clevr_test.json").read_text())
    rows = [{**record, "prediction": f"Answer: {int(record['answer']) + i % 2}"} for i, record in enumerate(clevr)]
    cases.append(("clevr-math", [], _write(folder / "clevr.jsonl", rows)))
    return cases


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "r3v.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"r3v {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def normalise(value: Any, roots: list[str]) -> Any:
    """JSON without the volatile keys, with the temporary folders' paths replaced by placeholders."""
    if isinstance(value, dict):
        return {k: normalise(v, roots) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [normalise(v, roots) for v in value]
    if isinstance(value, str):
        for index, root in enumerate(roots):
            value = value.replace(root, f"<root{index}>")
        return value
    return value


def digest_file(path: Path, roots: list[str]) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl", ".yaml"):
        try:
            if path.suffix == ".jsonl":
                parsed = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            elif path.suffix == ".yaml":
                import yaml

                parsed = yaml.safe_load(data.decode())
            else:
                parsed = json.loads(data)
            data = json.dumps(normalise(parsed, roots), sort_keys=True).encode()
        except ValueError:
            pass
    return hashlib.sha256(data).hexdigest()[:16]


def snapshot() -> dict[str, str]:
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        roots = [str(root.resolve()), str(REPO)]
        run([*TRAIN, "--out", str(root / "run")], root)
        for path in sorted((root / "run").rglob("*")):
            if path.is_file() and path.name not in VOLATILE_FILES and not SKIPPED_PARTS & set(path.parts):
                out[f"train/{path.relative_to(root / 'run')}"] = digest_file(path, roots)
        stdout = run([*BENCH, "--out", str(root / "bench")], root)
        out["bench/stdout.json"] = hashlib.sha256(json.dumps(normalise(json.loads(stdout), roots),
                                                             sort_keys=True).encode()).hexdigest()[:16]
        for name in ("results.json", "items.jsonl", "samples.jsonl"):
            out[f"bench/{name}"] = digest_file(root / "bench" / name, roots)
        for number, (task, extra, predictions) in enumerate(score_inputs(root)):
            verdicts = root / f"verdicts{number}.jsonl"
            stdout = run(["score", "--task", task, str(predictions), "--json", "--out", str(verdicts), *extra], root)
            key = f"score/{task}{''.join(extra).replace('--task-arg', ':')}"
            out[f"{key}/stdout"] = hashlib.sha256(stdout.encode()).hexdigest()[:16]
            out[f"{key}/verdicts"] = digest_file(verdicts, roots)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="Write the snapshot here.")
    group.add_argument("--compare", type=Path, help="Compare with this snapshot; exit 1 on any difference.")
    args = parser.parse_args()
    now = snapshot()
    if args.save:
        args.save.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
        print(f"{len(now)} digests -> {args.save}")
        return
    before = json.loads(args.compare.read_text())
    differ = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    gone, new = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    for label, keys in (("differs", differ), ("missing now", gone), ("new", new)):
        for key in keys:
            print(f"{label}: {key}")
    same = len(before.keys() & now.keys()) - len(differ)
    print(f"{same} of {len(before)} recorded outputs identical; {len(differ)} differ, {len(gone)} missing, {len(new)} new")
    sys.exit(1 if differ or gone or new else 0)


if __name__ == "__main__":
    main()
