"""A small ChartQA-format dataset of real-size charts, rendered with PIL: no download, exact answers.

Each chart is an 800x600 bar or line chart with a title, axis labels, a value label on every bar
or point and gridlines, drawn from a seeded random table. The folder has the official ChartQA
layout, so ``r3v.tasks.chartqa.ChartQA().load(split, data_dir=DIR)`` reads it:

    DIR/train/train_human.json   [{"imgname": "chart_0000.png", "query": "...", "label": "42"}, ...]
    DIR/train/png/chart_0000.png
    DIR/train/tables.json        the table behind each chart (what every label is computed from)
    DIR/train/rationales.json    a worked solution per question (``write_warmup`` makes r3v distill JSONL)
    DIR/test/...                 the same for the test split
    DIR/chart_data.json          the settings, so a rerun with the same ones reuses the folder

Labels are exact: values are whole numbers, the highest and lowest values of a chart are unique,
and every question's label is computed from the table. The data measure speed and memory at
real image sizes; they are not a benchmark of chart understanding.

    python benchmarks/chart_data.py --out /tmp/charts --train-charts 8 --test-charts 4
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from r3v.io import atomic_folder

VERSION = 2  # 2: rationales.json
MANIFEST = "chart_data.json"
SPLITS = ("train", "test")

# category sets for bar charts: (title, x-axis label, y-axis label, names)
BAR_TOPICS = [
    ("Fruit sold at the market", "Fruit", "Crates sold",
     ["Apples", "Pears", "Plums", "Cherries", "Grapes", "Lemons", "Peaches", "Figs"]),
    ("Visitors by city", "City", "Visitors (thousands)",
     ["Paris", "Lyon", "Nantes", "Lille", "Nice", "Rennes", "Dijon", "Brest"]),
    ("Books borrowed by genre", "Genre", "Books",
     ["Poetry", "History", "Science", "Travel", "Crime", "Cooking", "Art", "Sport"]),
    ("Energy use by sector", "Sector", "Share of total (%)",
     ["Homes", "Transport", "Industry", "Farming", "Services", "Shops", "Schools", "Health"]),
]
LINE_TOPICS = [
    ("Annual rainfall", "Year", "Rainfall (cm)"),
    ("Bicycles sold per year", "Year", "Bicycles (hundreds)"),
    ("Average price of coffee", "Year", "Price (cents)"),
]


def make_table(rng: random.Random, kind: str) -> dict[str, Any]:
    """One chart's data: 4 to 7 categories with distinct whole values in [5, 95]."""
    size = rng.randint(4, 7)
    if kind == "bar":
        title, x_label, y_label, names = rng.choice(BAR_TOPICS)
        categories = rng.sample(names, size)
    else:
        title, x_label, y_label = rng.choice(LINE_TOPICS)
        start = rng.randint(2005, 2016)
        categories = [str(start + i) for i in range(size)]
    # distinct values make "highest" and "lowest" unique
    values = rng.sample(range(5, 96), size)
    return {"kind": kind, "title": title, "x_label": x_label, "y_label": y_label,
            "categories": categories, "values": values}


def make_questions(rng: random.Random, table: dict[str, Any], count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (question, label, rationale) triples, all computed from the table.

    The rationale is a worked solution ending before the answer line, what a teacher would write;
    ``write_warmup`` turns it into r3v's distill format.
    """
    cats, vals = table["categories"], table["values"]
    value = dict(zip(cats, vals, strict=True))
    highest, lowest = cats[vals.index(max(vals))], cats[vals.index(min(vals))]
    a, b = rng.sample(cats, 2)
    pick = rng.choice(cats)
    listing = ", ".join(f"{c} {v}" for c, v in zip(cats, vals, strict=True))
    diff = abs(value[a] - value[b])
    big, small = (a, b) if value[a] >= value[b] else (b, a)
    diff_steps = f"{a} is {value[a]} and {b} is {value[b]}. {value[big]} - {value[small]} = {diff}."
    if table["kind"] == "bar":
        pool = [
            (f"What is the value of {pick}?", str(value[pick]), f"The bar for {pick} is labelled {value[pick]}."),
            ("Which category has the highest value?", highest,
             f"The values are {listing}. The largest is {max(vals)}, for {highest}."),
            ("Which category has the lowest value?", lowest,
             f"The values are {listing}. The smallest is {min(vals)}, for {lowest}."),
            (f"What is the difference between {a} and {b}?", str(diff), diff_steps),
            (f"What is the sum of {a} and {b}?", str(value[a] + value[b]),
             f"{a} is {value[a]} and {b} is {value[b]}. {value[a]} + {value[b]} = {value[a] + value[b]}."),
        ]
    else:
        change = vals[-1] - vals[0]
        pool = [
            (f"What was the value in {pick}?", str(value[pick]), f"The point for {pick} is labelled {value[pick]}."),
            ("In which year was the value the highest?", highest,
             f"The values are {listing}. The largest is {max(vals)}, in {highest}."),
            ("In which year was the value the lowest?", lowest,
             f"The values are {listing}. The smallest is {min(vals)}, in {lowest}."),
            (f"What is the difference between the values in {a} and {b}?", str(diff), diff_steps),
            (f"By how much did the value change from {cats[0]} to {cats[-1]}?", str(change),
             f"{cats[0]} is {vals[0]} and {cats[-1]} is {vals[-1]}. {vals[-1]} - {vals[0]} = {change}."),
        ]
    return rng.sample(pool, min(count, len(pool)))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def render_chart(table: dict[str, Any], width: int = 800, height: int = 600) -> Image.Image:
    """Draw a table as a bar or line chart: title, axis labels, ticks, gridlines, a label per value."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, label_font, small_font = _font(26), _font(18), _font(15)
    left, right, top, bottom = 90, width - 40, 80, height - 90
    draw.text(((width - _text_width(draw, table["title"], title_font)) / 2, 22), table["title"], fill="black",
              font=title_font)
    draw.text(((left + right - _text_width(draw, table["x_label"], label_font)) / 2, height - 40), table["x_label"],
              fill="black", font=label_font)
    y_label = Image.new("RGB", (int(_text_width(draw, table["y_label"], label_font)) + 4, 24), "white")
    ImageDraw.Draw(y_label).text((2, 0), table["y_label"], fill="black", font=label_font)
    rotated = y_label.rotate(90, expand=True)
    image.paste(rotated, (14, (top + bottom - rotated.height) // 2))

    top_value = 100
    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / top_value

    for tick in range(0, top_value + 1, 20):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225), width=1)
        text = str(tick)
        draw.text((left - 10 - _text_width(draw, text, small_font), y - 9), text, fill="black", font=small_font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)

    cats, vals = table["categories"], table["values"]
    slot = (right - left) / len(cats)
    centres = [left + slot * (i + 0.5) for i in range(len(cats))]
    if table["kind"] == "bar":
        for x, value in zip(centres, vals, strict=True):
            draw.rectangle([x - slot * 0.3, y_of(value), x + slot * 0.3, bottom], fill=(66, 114, 196))
    else:
        points = [(x, y_of(v)) for x, v in zip(centres, vals, strict=True)]
        draw.line(points, fill=(196, 78, 66), width=3)
        for x, y in points:
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(196, 78, 66))
    for x, value, name in zip(centres, vals, cats, strict=True):
        text = str(value)
        half = _text_width(draw, text, small_font) / 2
        y = y_of(value) - 26
        if table["kind"] == "line":  # a white box keeps the label readable where the line crosses it
            draw.rectangle([x - half - 2, y, x + half + 2, y + 18], fill="white")
        draw.text((x - half, y), text, fill="black", font=small_font)
        draw.text((x - _text_width(draw, name, small_font) / 2, bottom + 8), name, fill="black", font=small_font)
    return image


def write_chart_dataset(
    out: str | Path,
    train_charts: int = 8,
    test_charts: int = 4,
    questions_per_chart: int = 2,
    seed: int = 0,
    width: int = 800,
    height: int = 600,
) -> Path:
    """Write the dataset to ``out`` (reused when it was written with the same settings) and return it.

    Charts alternate bar and line; each split has its own random stream, so adding test charts
    leaves the train split unchanged. Written to a temporary folder and renamed when complete.
    """
    settings = {"version": VERSION, "train_charts": train_charts, "test_charts": test_charts,
                "questions_per_chart": questions_per_chart, "seed": seed, "width": width, "height": height}
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("settings") == settings:
        return out
    with atomic_folder(out) as tmp:
        counts = {}
        for split_index, (split, charts) in enumerate(zip(SPLITS, (train_charts, test_charts), strict=True)):
            counts[split] = _write_split(tmp / split, split, charts, questions_per_chart,
                                         random.Random(seed * 1000 + split_index), width, height)
        (tmp / MANIFEST).write_text(json.dumps({"settings": settings, "questions": counts}, indent=2) + "\n")
    return out


def _write_split(folder: Path, split: str, charts: int, per_chart: int, rng: random.Random,
                 width: int, height: int) -> int:
    (folder / "png").mkdir(parents=True)
    records: list[dict[str, str]] = []
    rationales: list[str] = []
    tables: dict[str, Any] = {}
    for index in range(charts):
        table = make_table(rng, "bar" if index % 2 == 0 else "line")
        name = f"chart_{index:04d}.png"
        render_chart(table, width, height).save(folder / "png" / name)
        tables[name] = table
        for question, label, rationale in make_questions(rng, table, per_chart):
            records.append({"imgname": name, "query": question, "label": label})
            rationales.append(rationale)
    (folder / f"{split}_human.json").write_text(json.dumps(records, indent=1) + "\n")
    (folder / "tables.json").write_text(json.dumps(tables, indent=1) + "\n")
    # aligned with the records; kept apart so the question file has ChartQA's three keys only
    (folder / "rationales.json").write_text(json.dumps(rationales, indent=1) + "\n")
    return len(records)


def write_warmup(data_dir: str | Path, limit: int | None = None) -> Path:
    """The train split's worked solutions as r3v distill JSONL (``--warmup-file``), for its first
    ``limit`` questions: r3v refuses ids outside the train split in use, so the file must match
    ``--train-limit``. Prompts are the chartqa task's own chain-of-thought prompts."""
    from r3v.tasks.chartqa import ChartQA

    data_dir = Path(data_dir)
    task = ChartQA(hf_dataset="")
    examples = task.load("train", data_dir=data_dir, limit=limit)
    rationales = json.loads((data_dir / "train" / "rationales.json").read_text())
    path = data_dir / "train" / f"warmup_{len(examples)}.jsonl"
    lines = []
    for example in examples:
        index = int(example.id.rsplit("-", 1)[1])  # "human-<record index>"
        target = f"{rationales[index]}\n{task.answer_line(example.answer, example)}"
        lines.append(json.dumps({"example_id": example.id, "task": task.name, "prompt": task.cot_prompt(example),
                                 "target": target}))
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a small ChartQA-format dataset with exact answers.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-charts", type=int, default=8)
    parser.add_argument("--test-charts", type=int, default=4)
    parser.add_argument("--questions-per-chart", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    args = parser.parse_args(argv)
    path = write_chart_dataset(args.out, args.train_charts, args.test_charts, args.questions_per_chart, args.seed,
                               args.width, args.height)
    print(json.loads((path / MANIFEST).read_text()))


if __name__ == "__main__":
    main()
