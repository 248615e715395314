"""``clevr-synth``: a CLEVR-Math-style counting task rendered with pillow, fully offline.

Each image is a 4x4 grid of 28 px cells (112 px, i.e. one Qwen2-VL image token per cell) holding
coloured squares and circles. Questions add or remove objects and ask for a count, as CLEVR-Math's
addition and subtraction templates do. Everything derives from (split, index, seed), so the data
is identical on every machine. Answers are integers; extraction and scoring follow CLEVR-Math.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from r3v.records import Example
from r3v.registry import tasks
from r3v.seeds import stride_seed

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle")
GRID = 4
CELL = 28
#: ``pretrain`` is what the built-in base model learned from; the R3V loop uses train and test.
SPLIT_SIZES = {"train": 1500, "test": 200, "pretrain": 4000}
SPLIT_OFFSET = {"train": 0, "test": 1_000_003, "pretrain": 2_000_003}

_BARE_INT = re.compile(r"-?\d+")
_ANSWER_INT = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Scene:
    objects: tuple[tuple[int, str, str], ...]  # (cell, colour, shape)

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(
            1 for _, c, s in self.objects if (color is None or c == color) and (shape is None or s == shape)
        )


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(2, 8)
    cells = rng.sample(range(GRID * GRID), n)
    return Scene(tuple((cell, rng.choice(list(COLORS)), rng.choice(SHAPES)) for cell in sorted(cells)))


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for cell, color, shape in scene.objects:
        x, y = (cell % GRID) * CELL, (cell // GRID) * CELL
        box = (x + 4, y + 4, x + CELL - 5, y + CELL - 5)
        if shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.ellipse(box, fill=COLORS[color])
    return image


def make_question(scene: Scene, rng: random.Random) -> tuple[str, int, str]:
    """A question, its answer, and the teacher's rationale (without the answer line)."""
    total = len(scene.objects)
    template = rng.randrange(3)
    if template == 0:
        color = rng.choice([c for _, c, _ in scene.objects])
        removed = scene.count(color=color)
        answer = total - removed
        question = f"Subtract all {color} objects. How many objects are left?"
        steps = f"There are {total} objects. There are {removed} {color} objects. {total} - {removed} = {answer}."
    elif template == 1:
        shape = rng.choice(SHAPES)
        removed = scene.count(shape=shape)
        answer = total - removed
        question = f"Subtract all {shape}s. How many objects are left?"
        steps = f"There are {total} objects. There are {removed} {shape}s. {total} - {removed} = {answer}."
    else:
        shape = rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        added = rng.randint(1, 3)
        have = scene.count(shape=shape)
        answer = have + added
        question = f"Add {added} {color} {shape}s. How many {shape}s are there?"
        steps = f"There are {have} {shape}s. {have} + {added} = {answer}."
    return question, answer, steps


@tasks.register("clevr-synth")
class ClevrSynth:
    name = "clevr-synth"
    splits = ("train", "test", "pretrain")
    sources = "built in: rendered with pillow from a seed (no download)"
    breakdown_keys = ("template",)

    def __init__(
        self, seed: int = 0, sizes: dict[str, int] | None = None, train_size: int | None = None,
        test_size: int | None = None,
    ) -> None:
        self.seed = seed
        self.sizes = dict(SPLIT_SIZES, **(sizes or {}))
        # e.g. --task-arg test_size=1000: on a dev dataset (seed=N), a smaller standard error
        for split, size in (("train", train_size), ("test", test_size)):
            if size is not None:
                if size < 1:
                    raise ValueError(f"{split}_size must be >= 1, got {size}")
                self.sizes[split] = size

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"clevr-synth has splits {', '.join(self.splits)}, not {split!r}")
        count = self.sizes[split] if limit is None else min(limit, self.sizes[split])
        return [self.example(split, i) for i in range(count)]

    def scene(self, split: str, index: int) -> Scene:
        """The scene behind ``example(split, index)``: what is in each cell."""
        return make_scene(self._rng(split, index))

    def _rng(self, split: str, index: int) -> random.Random:
        return random.Random(stride_seed(self.seed, SPLIT_OFFSET[split] + index, stride=7_919))

    def example(self, split: str, index: int) -> Example:
        rng = self._rng(split, index)
        scene = make_scene(rng)
        question, answer, steps = make_question(scene, rng)
        return Example(
            id=f"{split}-{index}",
            task=self.name,
            question=question,
            answer=str(answer),
            images=[render(scene)],
            metadata={"rationale": steps, "template": question.split()[0].lower()},
        )

    def cot_prompt(self, example: Example) -> str:
        return (
            f"{example.question}\nFirst generate a step-by-step solution, "
            "then answer the question using a single numerical value."
        )

    def qa_prompt(self, example: Example) -> str:
        return f"{example.question}\nAnswer the question using a single numerical value."

    def answer_line(self, answer: Any, example: Example) -> str:
        return f"Answer: {answer}"

    def teacher_rationale(self, example: Example) -> str:
        """The programmatic teacher's chain of thought, ending in the answer line."""
        return f"{example.metadata['rationale']}\n{self.answer_line(example.answer, example)}"

    def select_instruction(self, example: Example) -> str:
        return "Which prediction is correct? Give the final answer as a single numerical value."

    def extract(self, text: str, example: Example) -> str | None:
        stripped = text.strip()
        if _BARE_INT.fullmatch(stripped):
            return str(int(stripped))
        match = _ANSWER_INT.search(text)
        return str(int(match.group(1))) if match else None

    def normalize(self, answer: str, example: Example) -> str:
        return answer.strip()

    def is_correct(self, answer: str | None, example: Example) -> bool:
        return answer is not None and answer == str(example.answer)


def corpus_lines() -> list[str]:
    """Text the tiny tokenizers are trained on: every clevr-synth prompt and rationale shape."""
    task = ClevrSynth()
    lines = []
    for i in range(300):
        ex = task.example("train", i)
        lines += [task.cot_prompt(ex), task.teacher_rationale(ex), task.select_instruction(ex)]
    return lines
