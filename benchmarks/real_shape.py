"""One R3V iteration at real model shapes (random weights, no download): time, tokens/s and memory per phase.

For ``--model {qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-7b}`` this script

1. builds the model from its public config with random weights (``r3v.models.real_shape``, cached
   in ``--work``; the build runs in a child process so that its peak memory is measured alone)
   and renders a small ChartQA-format dataset of 800x600 charts (``chart_data.py``), with worked
   solutions as the warm-up file;
2. measures the visual tokens per chart with the model's own processor at the run's pixel cap;
3. runs ONE R3V iteration through the real command line, ``python -m r3v.cli train ...``, as a
   child process (not in-process: the loop may start its own training process on a GPU, and a
   child's peak memory is then its own, not this script's);
4. reads what the run recorded (``RUN_DIR/resources.json``: seconds, tokens, tokens/s and peak
   memory per phase) and writes ``benchmarks/results/real_shape_<model>.json``.

Every number in the results file is measured by this run or read from the files it wrote. With
random weights the answers are noise, so accuracy is not reported; what is measured is cost.

    python benchmarks/real_shape.py --model qwen2-vl-2b --dry-run --work /tmp/rs     # print the command only
    python benchmarks/real_shape.py --model qwen2-vl-2b --work /tmp/rs                # CPU: about 30 min
    python benchmarks/real_shape.py --model qwen2-vl-7b --work /tmp/rs --backend vllm # GPU

It needs only what ``r3v train`` needs (torch, transformers, peft, accelerate, pillow, click,
rich, tokenizers); the chartqa task reads the local folder without ``datasets``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from machine import describe_machine, load_average  # noqa: E402
from report import update_readme_section  # noqa: E402

MODELS = {"qwen2-vl-2b": "qwen2-vl-2b-instruct", "qwen2-vl-7b": "qwen2-vl-7b-instruct",
          "qwen2.5-vl-7b": "qwen2.5-vl-7b-instruct"}
PHASES = ("loading", "sampling", "building", "training", "evaluation")
PHASE_FIELDS = ("seconds", "tokens", "prompt_tokens", "tokens_per_second", "peak_rss_mib", "cuda_max_allocated_mib",
                "cuda_max_reserved_mib")
RESOURCES = "resources.json"
#: The Qwen2-VL family's training pixel cap in r3v (768x768); the run and the token count use it.
DEFAULT_MAX_PIXELS = 768 * 768


class ResultsError(RuntimeError):
    """The run did not leave what the results file is made from."""


# ---------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--work", type=Path, default=Path("runs/real_shape"),
                   help="Folder for the built model, the charts and the run (kept between calls).")
    p.add_argument("--results", type=Path, default=None,
                   help="Results file [default: benchmarks/results/real_shape_<model>.json; _<backend> added "
                        "for a backend other than hf].")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="Dtype of the built weights on disk (r3v loads them in its own dtype per device).")
    p.add_argument("--seed", type=int, default=0, help="Seeds the weights, the charts and the run.")
    p.add_argument("--config", type=Path, default=None,
                   help="Build from this config file instead of the model's shipped one (e.g. a reduced copy, "
                        "for a quick smoke run of the whole script); --model then only names the results.")
    limits = p.add_argument_group("limits (passed to r3v train)")
    limits.add_argument("--train-limit", type=int, default=8)
    limits.add_argument("--test-limit", type=int, default=4)
    limits.add_argument("--samples-per-iteration", type=int, default=3)
    limits.add_argument("--epochs", type=float, default=1)
    limits.add_argument("--eval-samples", type=int, default=3)
    limits.add_argument("--max-new-tokens", type=int, default=32)
    limits.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="Image pixel cap for sampling and training; visual tokens are counted at it.")
    limits.add_argument("--lora-r", type=int, default=8, help="The Qwen2-VL preset's rank.")
    limits.add_argument("--lora-alpha", type=int, default=16, help="The Qwen2-VL preset's alpha.")
    limits.add_argument("--batch-size", type=int, default=None, help="Per-device micro-batch [default: r3v's].")
    limits.add_argument("--global-batch", type=int, default=None, help="Items per optimizer step [default: r3v's].")
    limits.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="[default: r3v's choice: on for models over 1B parameters]")
    limits.add_argument("--training-process", choices=("auto", "separate", "inline"), default=None,
                        help="[default: r3v's: auto, its own process when a GPU is used]")
    limits.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="Pass the charts' worked solutions as --warmup-file (distilled CoT in the mixture).")
    limits.add_argument("--extra", action="append", default=[], metavar="ARG",
                        help="One more argument for r3v train, e.g. --extra=--max-model-len=4096 (repeatable).")
    data = p.add_argument_group("data")
    data.add_argument("--train-charts", type=int, default=None, help="[default: enough for --train-limit]")
    data.add_argument("--test-charts", type=int, default=None, help="[default: enough for --test-limit]")
    data.add_argument("--questions-per-chart", type=int, default=2)
    p.add_argument("--resume", action="store_true",
                   help="Continue the run folder left by an interrupted call; by default it is removed first, so "
                        "every phase is measured in this call (a resumed phase's cost spans both calls).")
    p.add_argument("--dry-run", action="store_true", help="Print the r3v train command and stop; builds nothing.")
    args = p.parse_args(argv)
    per_chart = args.questions_per_chart
    if args.train_charts is None:
        args.train_charts = -(-args.train_limit // per_chart)
    if args.test_charts is None:
        args.test_charts = -(-args.test_limit // per_chart)
    return args


def work_paths(args: argparse.Namespace) -> dict[str, Path]:
    work = args.work.resolve()
    config = args.config.stem if args.config is not None else MODELS[args.model]
    return {
        "model": work / "models" / f"{config}-{args.dtype}-seed{args.seed}",
        "charts": work / "charts" / f"seed{args.seed}-{args.train_charts}x{args.test_charts}x{args.questions_per_chart}",
        "run": work / "runs" / f"{config}-{args.backend}-seed{args.seed}",
    }


def config_of(args: argparse.Namespace) -> str:
    """The config the model is built from: the model's shipped one, or ``--config``."""
    return str(args.config) if args.config is not None else MODELS[args.model]


def results_path(args: argparse.Namespace) -> Path:
    if args.results is not None:
        return args.results
    suffix = "" if args.backend == "hf" else f"_{args.backend}"
    return HERE / "results" / f"real_shape_{args.model}{suffix}.json"


def limits_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("train_limit", "test_limit", "samples_per_iteration", "epochs", "eval_samples", "max_new_tokens",
            "max_pixels", "lora_r", "lora_alpha", "batch_size", "global_batch", "gradient_checkpointing",
            "training_process", "warmup", "resume")
    return {key: getattr(args, key) for key in keys}


# ---------------------------------------------------------------- the command
def train_command(args: argparse.Namespace, paths: dict[str, Path], warmup_file: Path | None) -> list[str]:
    """The ``r3v train`` command line of the run, as a child process of this Python."""
    command = [
        sys.executable, "-m", "r3v.cli", "train",
        "--iterations", "1", "--model", str(paths["model"]), "--task", "chartqa", "--data-dir", str(paths["charts"]),
        "--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit),
        "--samples-per-iteration", str(args.samples_per_iteration), "--epochs", _number(args.epochs),
        "--eval-samples", str(args.eval_samples), "--max-new-tokens", str(args.max_new_tokens),
        "--skip-warmup-train", "--lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
        "--max-pixels", str(args.max_pixels), "--backend", args.backend, "--seed", str(args.seed),
        "--out", str(paths["run"]),
    ]
    if warmup_file is not None:
        command += ["--warmup-file", str(warmup_file)]
    if args.batch_size is not None:
        command += ["--batch-size", str(args.batch_size)]
    if args.global_batch is not None:
        command += ["--global-batch", str(args.global_batch)]
    if args.gradient_checkpointing is not None:
        command.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    if args.training_process is not None:
        command += ["--training-process", args.training_process]
    return command + list(args.extra)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def unknown_flags(command: list[str]) -> list[str] | None:
    """Options in ``command`` that the installed ``r3v train`` does not define (read from its click
    command); None when r3v's command line cannot be imported by this Python."""
    try:
        from r3v.cli.train import train
    except ImportError:
        return None
    known = {opt for param in train.params for opt in (*param.opts, *param.secondary_opts)}
    flags = [part.split("=", 1)[0] for part in command[command.index("train") + 1:] if part.startswith("--")]
    return [flag for flag in flags if flag not in known]


# ---------------------------------------------------------------- measurements
def visual_tokens(model_dir: Path, images: list[Path], max_pixels: int) -> dict[str, Any]:
    """Visual tokens per image, counted with the model's own processor at the run's pixel cap.

    The cap is applied as ``r3v train --max-pixels`` applies it (``r3v.models.loading.set_pixel_cap``
    where this r3v has it); the count is one token per merged patch, ``t * h * w / merge_size**2``
    of the image grid the processor returns.
    """
    from PIL import Image

    from r3v.models import loading

    processor = loading.load_processor(str(model_dir))
    image_processor = processor.image_processor
    merge = int(getattr(image_processor, "merge_size", 2))
    min_pixels = _shortest_edge(image_processor)
    set_cap = getattr(loading, "set_pixel_cap", None)
    capped_by_r3v = bool(set_cap and set_cap(processor, max_pixels))
    per_image: dict[str, int] = {}
    grids: dict[str, list[int]] = {}
    for path in images:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        grid = _image_grid(image_processor, image, None if capped_by_r3v else (min_pixels, max_pixels))
        per_image[path.name] = int(grid[0] * grid[1] * grid[2]) // (merge * merge)
        grids[path.name] = grid
    counts = list(per_image.values())
    with Image.open(images[0]) as opened:
        width, height = opened.size
    return {
        "max_pixels": max_pixels, "min_pixels": min_pixels, "images": len(counts),
        "image_size": [width, height], "grid_thw_first": grids[images[0].name],
        "min": min(counts), "max": max(counts), "mean": round(statistics.mean(counts), 1),
    }


def _shortest_edge(image_processor) -> int:
    """The processor's lower pixel bound: ``size`` is a dict in some transformers 5.x releases and a
    SizeDict dataclass in others."""
    size = getattr(image_processor, "size", None)
    value = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return int(value if value is not None else getattr(image_processor, "min_pixels", 56 * 56))


def _image_grid(image_processor, image, bounds: tuple[int, int] | None) -> list[int]:
    if bounds is None:  # the processor already holds the cap
        out = image_processor(images=[image], return_tensors="pt")
    else:
        low, high = bounds
        try:  # transformers >= 5.2x: the pixel bounds are the size dict
            out = image_processor(images=[image], size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt")
        except (TypeError, ValueError):  # older: min_pixels / max_pixels keywords
            out = image_processor(images=[image], min_pixels=low, max_pixels=high, return_tensors="pt")
    return [int(v) for v in out["image_grid_thw"][0].tolist()]


def run_child(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command, echo and log its output; its wall time and peak RSS (``wait4``: the child and
    the children it waited for) are measured here."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                 errors="replace", bufsize=1)
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            log.write(line)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    return {"returncode": child.returncode, "wall_seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mib": round(kib / 1024, 1), "log": str(log_path)}


def child_env() -> dict[str, str]:
    """The run's environment: this repository importable, and the hub never asked (no network there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def ensure_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Build the model in a child process unless the cached folder is this config, seed and dtype."""
    from r3v.models.real_shape import is_current_build, read_marker

    config = config_of(args)
    if is_current_build(model_dir, config, args.seed, args.dtype):
        marker = read_marker(model_dir) or {}
        return {"reused": True, "build_seconds_when_built": marker.get("build_seconds"), "path": str(model_dir)}
    command = [sys.executable, "-m", "r3v.models.real_shape", "--config", config, "--out", str(model_dir),
               "--seed", str(args.seed), "--dtype", args.dtype]
    child = run_child(command, model_dir.parent / f"{model_dir.name}.build.log", child_env())
    if child["returncode"] != 0:
        raise ResultsError(f"building {config} failed (exit {child['returncode']}); see {child['log']}")
    return {"reused": False, "seconds": child["wall_seconds"], "peak_rss_mib": child["peak_rss_mib"],
            "path": str(model_dir)}


# ---------------------------------------------------------------- reading the run
def read_resources(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/resources.json``, checked: ``{"iterations": {k: {phase: {...}}}, "device": ...}``."""
    path = Path(run_dir) / RESOURCES
    if not path.exists():
        raise ResultsError(
            f"{path} is missing: this r3v train does not record resources per phase. The results file needs "
            "r3v's loop to write RUN_DIR/resources.json (seconds, tokens, tokens/s and peak memory per phase)."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON: {exc}") from exc
    iterations = data.get("iterations") if isinstance(data, dict) else None
    if not isinstance(iterations, dict) or not iterations:
        raise ResultsError(f"{path} has no per-iteration records under 'iterations'")
    return data


def phase_table(resources: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per iteration and phase: seconds, tokens, tokens/s and peak memory as recorded; and which phases
    no iteration recorded. tokens/s is tokens / seconds when the file gives the two but not the rate."""
    table: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for k, phases in sorted(resources["iterations"].items(), key=lambda item: int(item[0])):
        row: dict[str, Any] = {}
        for phase in PHASES:
            record = phases.get(phase) if isinstance(phases, dict) else None
            if not isinstance(record, dict):
                continue
            seen.add(phase)
            entry = {field: record.get(field) for field in PHASE_FIELDS}
            if entry["tokens_per_second"] is None and entry["tokens"] and entry["seconds"]:
                entry["tokens_per_second"] = round(entry["tokens"] / entry["seconds"], 1)
            row[phase] = entry
        table[str(k)] = row
    return table, [phase for phase in PHASES if phase not in seen]


def peaks_over_phases(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The largest recorded peak of each memory measure, and the phase (iteration/phase) it came from."""
    peaks: dict[str, Any] = {}
    for field in ("peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib"):
        found = [(entry[field], f"{k}/{phase}") for k, row in phases.items() for phase, entry in row.items()
                 if entry.get(field) is not None]
        value, where = max(found, key=lambda pair: pair[0]) if found else (None, None)
        peaks[field] = {"value": value, "phase": where}
    return peaks


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Items trained on and training losses per iteration, from metrics.jsonl (not accuracy: random weights)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(row.get("iteration")): {"items": row.get("items"), "train_losses": row.get("train_losses")}
            for row in rows}


def build_results(args: argparse.Namespace, paths: dict[str, Path], command: list[str], *, machine: dict[str, Any],
                  parameters: dict[str, int], build: dict[str, Any], tokens: dict[str, Any],
                  data: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The results record: what ran, on what, and what it measured."""
    from r3v.models.real_shape import load_spec

    resources = read_resources(paths["run"])
    phases, missing = phase_table(resources)
    source = load_spec(config_of(args)).source
    return {
        "benchmark": "real_shape",
        "status": "ok",
        "model": args.model,
        "config": config_of(args),
        "config_source": source.get("values_from") if isinstance(source, dict) else source,
        "weights": "random (seeded); accuracy is not meaningful and not reported",
        "machine": machine,
        "backend": args.backend,
        "command": command,
        "command_line": shlex.join(command),
        "limits": limits_of(args),
        "parameters": parameters,
        "model_build": {**build, "dtype": args.dtype, "seed": args.seed},
        "data": data,
        "visual_tokens_per_image": tokens,
        "run": run,
        "device": resources.get("device"),
        "phases": phases,
        "phases_missing": missing,
        "peaks": peaks_over_phases(phases),
        "iterations": run_summary(paths["run"]),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = work_paths(args)
    warmup_file = paths["charts"] / "train" / f"warmup_{args.train_limit}.jsonl" if args.warmup else None
    command = train_command(args, paths, warmup_file)
    unknown = unknown_flags(command)
    if args.dry_run:
        print(shlex.join(command))
        print(f"# model: {paths['model']} (built on a real run)\n# charts: {paths['charts']}\n# results: {results_path(args)}")
        if unknown is None:
            print("# note: r3v's command line does not import with this Python, so its options were not checked")
        elif unknown:
            print(f"# note: this r3v train does not accept {' '.join(unknown)} yet")
        return 0
    load_at_start = load_average()
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        write_json(results_path(args), {"benchmark": "real_shape", "status": "not installed", "model": args.model,
                                        "backend": "vllm", "machine": describe_machine(load_at_start),
                                        "command_line": shlex.join(command)})
        print(f"vllm is not installed: recorded in {results_path(args)}")
        return 0
    if unknown is None:
        raise ResultsError("r3v's command line does not import with this Python; run it with r3v's environment")
    if unknown:
        raise ResultsError(f"this r3v train does not accept {' '.join(unknown)}; update r3v, or drop them")

    from chart_data import write_chart_dataset, write_warmup

    from r3v.models.real_shape import parameter_counts

    build = ensure_model(args, paths["model"])
    charts = write_chart_dataset(paths["charts"], args.train_charts, args.test_charts, args.questions_per_chart,
                                 seed=args.seed)
    if warmup_file is not None:
        written = write_warmup(charts, args.train_limit)
        if written != warmup_file:  # fewer train questions than --train-limit
            raise ResultsError(f"the charts hold fewer than {args.train_limit} train questions; raise --train-charts")
    images = sorted((charts / "train" / "png").glob("*.png")) + sorted((charts / "test" / "png").glob("*.png"))
    tokens = visual_tokens(paths["model"], images, args.max_pixels)
    manifest = json.loads((charts / "chart_data.json").read_text())
    data = {"path": str(charts), "questions": manifest["questions"], "charts": {"train": args.train_charts,
            "test": args.test_charts}, "warmup_file": str(warmup_file) if warmup_file else None}
    if paths["run"].exists() and not args.resume:
        shutil.rmtree(paths["run"])  # the script's own folder under --work: a finished run would be skipped
    run = run_child(command, paths["run"].parent / f"{paths['run'].name}.log", child_env())
    # r3v resets the kernel's RSS high-water mark at every phase (r3v.meter), so wait4's peak for this
    # child covers only its last phase: the run's peaks are taken over the phases instead (peaks)
    run.pop("peak_rss_mib")
    if run["returncode"] != 0:
        raise ResultsError(f"r3v train exited with {run['returncode']}; see {run['log']}")
    record = build_results(args, paths, command, machine=describe_machine(load_at_start),
                           parameters=parameter_counts(config_of(args)), build=build, tokens=tokens, data=data,
                           run=run)
    write_json(results_path(args), record)
    begin, end = f"<!-- real-shape:{args.model}:{args.backend}:begin -->", f"<!-- real-shape:{args.model}:{args.backend}:end -->"
    update_readme_section(markdown(record, results_path(args)), begin, end)
    print(f"results: {results_path(args)}")
    return 0


def markdown(record: dict[str, Any], path: Path) -> str:
    """The README block for one results file: the run's settings and each phase's cost."""
    machine, limits, tokens = record["machine"], record["limits"], record["visual_tokens_per_image"]
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cores']} cores, {machine['ram_gib']} GiB)"
    model, backend = record["model"], record["backend"]
    lines = [
        f"<!-- real-shape:{model}:{backend}:begin -->",
        f"### {model} at real shape, {backend} backend ({path.name})",
        "",
        f"{record['parameters']['total'] / 1e9:.2f}B parameters with random weights, on {device}, "
        f"{machine['date'][:10]}. One R3V iteration through `r3v train`: {limits['train_limit']} train and "
        f"{limits['test_limit']} test charts (800x600, {tokens['mean']:.0f} visual tokens each at "
        f"`--max-pixels {limits['max_pixels']}`), N = {limits['samples_per_iteration']}, "
        f"{limits['max_new_tokens']} new tokens, LoRA r {limits['lora_r']} / alpha {limits['lora_alpha']}, "
        f"{limits['epochs']} epoch. Tokens: generated or trained on; prompt tokens: read (each question once).",
        "",
        "| iteration | phase | seconds | tokens | prompt tokens | tokens/s | peak RSS (MiB) | CUDA max allocated / reserved (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for iteration, phases in sorted(record["phases"].items()):
        for phase in PHASES:
            entry = phases.get(phase)
            if not entry:
                continue
            rate = entry.get("tokens_per_second")
            cuda = (f"{entry['cuda_max_allocated_mib']:.0f} / {entry['cuda_max_reserved_mib']:.0f}"
                    if entry.get("cuda_max_allocated_mib") is not None else "-")
            lines.append(f"| {iteration} | {phase} | {entry['seconds']:.1f} | {entry['tokens']} | "
                         f"{entry.get('prompt_tokens') or 0} | {'-' if rate is None else rate} | "
                         f"{entry['peak_rss_mib']:.0f} | {cuda} |")
    lines += ["", f"<!-- real-shape:{model}:{backend}:end -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
