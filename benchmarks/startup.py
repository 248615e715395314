"""Start-up cost of a training call against the size of the mixture: lazy item encoding against
encoding every item up front (what r3v's trainer did before), in one run.

Data: an R3V-like mixture over chart-sized images on disk (800x600 PNG, 6 items per image:
QA, CoT, refine and select prompts, as an R3V iteration has per question), with the tiny
Qwen2-VL processor set to the Qwen2-VL reference pixel cap (768x768, so each image becomes
about 600 visual tokens, as a chart does for a real Qwen2-VL). For each mixture size:

- ``lazy``: what r3v's trainer does before its first step now: build ``ItemDataset`` (token
  lengths from text and image sizes, the processor run once per distinct image size) and
  encode the first step's items;
- ``eager``: the previous behaviour: encode every item (images included) before the first step.

Both arms run in this process on the same files, one torch thread, alternating order per size.

    .venv/bin/python benchmarks/startup.py            # writes benchmarks/results/startup.json
    .venv/bin/python benchmarks/startup.py --sizes 600,2400 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, load_average  # noqa: E402
from report import update_readme_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
ITEMS_PER_IMAGE = 6
STEP_ITEMS = 64  # R3V's global batch: the first step encodes this many items
PIXEL_CAP = 768 * 768
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"


def make_mixture(images: int, folder: Path) -> list:
    """TrainItems over ``images`` chart-sized PNG files, ITEMS_PER_IMAGE items each."""
    from PIL import Image, ImageDraw

    from r3v.records import TrainItem

    items = []
    for i in range(images):
        path = folder / f"chart{i}.png"
        if not path.exists():
            image = Image.new("RGB", (800, 600), (250, 250, 250))
            draw = ImageDraw.Draw(image)
            for bar in range(6):  # a different bar chart per file, so nothing compresses alike
                height = 40 + (i * 37 + bar * 91) % 480
                draw.rectangle((60 + bar * 120, 560 - height, 140 + bar * 120, 560), fill=(40 + bar * 30, 90, 200))
            image.save(path)
        question = f"What is the value of bar {i % 6 + 1}?"
        rationale = f"The bar {i % 6 + 1} reaches {i % 50}.\nAnswer: {i % 50}"
        items += [
            TrainItem("qa", f"q{i}", f"{question}\nAnswer the question with a number.", str(i % 50), images=[str(path)]),
            TrainItem("cot", f"q{i}", f"{question}\nFirst think step by step.", rationale, images=[str(path)]),
            TrainItem("refine", f"q{i}", f"{question}\nModel's prediction:\n{rationale} wrong\nFix it.", rationale,
                      images=[str(path)]),
            TrainItem("select", f"q{i}", f"{question}\nModel's prediction 1:\n{rationale}\nModel's prediction 2:\n"
                      f"Answer: 3\nWhich prediction is correct?", f"Answer: {i % 50}", images=[str(path)]),
            TrainItem("select", f"q{i}", f"{question}\nModel's prediction 1:\nAnswer: 7\nModel's prediction 2:\n"
                      f"{rationale}\nWhich prediction is correct?", f"Answer: {i % 50}", images=[str(path)]),
            TrainItem("cot", f"q{i}", f"{question}\nExplain, then answer.", rationale, images=[str(path)]),
        ]
    return items


def measure(arm: str, processor: Any, items: list) -> dict[str, float]:
    from r3v.train.data import CompletionCollator, ItemDataset, StepSampler

    start, cpu = time.perf_counter(), time.process_time()
    dataset = ItemDataset(processor, items, {}, max_length=4096, cache_bytes=0)
    built = time.perf_counter()
    if arm == "eager":
        # every item encoded before the first step; beyond its cache the old trainer kept none of
        # them (1 GiB holds about 90 of these items), so neither does this arm
        first = []
        for i in range(len(dataset)):
            features = dataset[i]
            if i < STEP_ITEMS:
                first.append(features)
    else:
        order = list(StepSampler(dataset.lengths, STEP_ITEMS, seed=0, pad_multiple=2))
        first = [dataset[i] for i in order[:STEP_ITEMS]]
    CompletionCollator(processor.tokenizer.pad_token_id)(first)
    done = time.perf_counter()
    return {"seconds_to_first_step": round(done - start, 3), "seconds_measuring": round(built - start, 3),
            "cpu_seconds": round(time.process_time() - cpu, 3)}


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        BEGIN,
        "## Start-up: time to the first training step against the mixture's size",
        "",
        f"`benchmarks/startup.py` on {machine['cpu']} ({machine['cores']} cores, one torch thread), "
        f"{machine['date'][:10]}; images 800x600 PNG at the Qwen2-VL reference cap "
        f"({results['visual_tokens_per_image']} visual tokens each), {ITEMS_PER_IMAGE} items per image, "
        f"first step = {STEP_ITEMS} items. Median of {results['repeats']} run(s), seconds.",
        "",
        "| items | lazy (r3v now) | of which measuring lengths | eager (every item encoded first) | eager / lazy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["sizes"]:
        lazy, eager = row["lazy"]["seconds_to_first_step"], row["eager"]["seconds_to_first_step"]
        lines.append(f"| {row['items']} | {lazy:.2f} | {row['lazy']['seconds_measuring']:.2f} | {eager:.2f} | "
                     f"{eager / lazy:.0f}x |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="600,2400,9600", help="Mixture sizes (items), comma-separated.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_at_start = load_average()

    import statistics

    import torch

    from r3v.models.processors import load_processor
    from r3v.models.tiny import tiny_model_path

    torch.set_num_threads(1)
    processor = load_processor(str(tiny_model_path("tiny-qwen2-vl")))
    # the reference cap, which the tiny model's own processor (112x112) is far below
    size = processor.image_processor.size
    processor.image_processor.size = type(size)(**{**vars(size), "longest_edge": PIXEL_CAP})
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measure("lazy", processor, make_mixture(4, folder))  # one-time costs (tokenizer, probes) off the clock
        for index, n in enumerate(sizes):
            items = make_mixture(-(-n // ITEMS_PER_IMAGE), folder)[:n]
            runs: dict[str, list[dict[str, float]]] = {"lazy": [], "eager": []}
            for repeat in range(args.repeats):
                order = ("lazy", "eager") if (index + repeat) % 2 == 0 else ("eager", "lazy")
                for arm in order:
                    runs[arm].append(measure(arm, processor, items))
            row: dict[str, Any] = {"items": n, "images": -(-n // ITEMS_PER_IMAGE)}
            for arm, values in runs.items():
                row[arm] = {key: statistics.median(v[key] for v in values) for key in values[0]}
            rows.append(row)
            print(json.dumps(row))
        from PIL import Image

        from r3v.models.batching import encode

        with Image.open(folder / "chart0.png") as image:
            probe = encode(processor, "<|vision_start|><|image_pad|><|vision_end|>", [image.convert("RGB")])
        visual_tokens = int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    results = {
        "benchmark": "startup",
        "repeats": args.repeats,
        "step_items": STEP_ITEMS,
        "pixel_cap": PIXEL_CAP,
        "visual_tokens_per_image": visual_tokens,
        "sizes": rows,
        "machine": describe_machine(load_at_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    update_readme_section(markdown(results), BEGIN, END)
    print(markdown(results))


if __name__ == "__main__":
    main()
