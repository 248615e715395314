"""``clevr-synth``: a CLEVR-Math-style counting task rendered with pillow, fully offline.

Each image is a 4x4 grid of 28 px cells (112 px, i.e. one Qwen2-VL image token per cell) holding
coloured squares and circles. Questions add or remove objects and ask for a count, as CLEVR-Math's
addition and subtraction templates do. Everything derives from (split, index, seed), so the data
is identical on every machine. Answers are integers; extraction and scoring follow CLEVR-Math.

A question's wording names everything it asks (``Query``), so its answer can be worked out for
any scene: the shortcut probes (``r3v.probe``) use that to ask it about another question's scene
(``gold_for_image``) and about its own scene with one object added or removed (``counterfactual``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from r3v.records import Example
from r3v.registry import tasks
from r3v.seeds import seeded_rng
from r3v.tasks.base import SeededTask

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle")
GRID = 4
CELL = 28
#: Objects per scene: ``make_scene`` draws between these, and a counterfactual edit stays between them.
MIN_OBJECTS, MAX_OBJECTS = 2, 8
#: ``pretrain`` is what the built-in base model learned from; the R3V loop uses train and test.
SPLIT_SIZES = {"train": 1500, "test": 200, "pretrain": 4000}
SPLIT_OFFSET = {"train": 0, "test": 1_000_003, "pretrain": 2_000_003}

#: "There are 5 objects", "There are 2 red objects", "There are 3 squares" (the teacher's steps).
_COUNT_CLAIM = re.compile(r"There are (\d+) (?:(red|blue|green|yellow) )?(objects|squares|circles)\b")
_EQUATION = re.compile(r"(-?\d+) ([+-]) (-?\d+) = (-?\d+)")


@dataclass(frozen=True)
class Scene:
    objects: tuple[tuple[int, str, str], ...]  # (cell, colour, shape)

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(
            1 for _, c, s in self.objects if (color is None or c == color) and (shape is None or s == shape)
        )


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
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


_COLOR_WORDS = "|".join(COLORS)
_SHAPE_WORDS = "|".join(SHAPES)
_SUBTRACT_COLOR = re.compile(rf"Subtract all ({_COLOR_WORDS}) objects\. How many objects are left\?")
_SUBTRACT_SHAPE = re.compile(rf"Subtract all ({_SHAPE_WORDS})s\. How many objects are left\?")
_ADD = re.compile(rf"Add (\d+) ({_COLOR_WORDS}) ({_SHAPE_WORDS})s\. How many \3s are there\?")


@dataclass(frozen=True)
class Query:
    """What a question asks: its template and the colour, shape and number it names. The answer
    and the teacher's steps follow from it for any scene (``solve``)."""

    #: 0: remove the objects of a colour; 1: remove the objects of a shape; 2: add objects of a shape.
    template: int
    color: str | None = None
    shape: str | None = None
    added: int = 0

    def question(self) -> str:
        if self.template == 0:
            return f"Subtract all {self.color} objects. How many objects are left?"
        if self.template == 1:
            return f"Subtract all {self.shape}s. How many objects are left?"
        return f"Add {self.added} {self.color} {self.shape}s. How many {self.shape}s are there?"

    def solve(self, scene: Scene) -> tuple[int, str]:
        """The answer about ``scene``, and the teacher's rationale (without the answer line)."""
        total = len(scene.objects)
        if self.template in (0, 1):
            removed = scene.count(color=self.color, shape=self.shape)
            what = f"{self.color} objects" if self.template == 0 else f"{self.shape}s"
            answer = total - removed
            return answer, f"There are {total} objects. There are {removed} {what}. {total} - {removed} = {answer}."
        have = scene.count(shape=self.shape)
        answer = have + self.added
        return answer, f"There are {have} {self.shape}s. {have} + {self.added} = {answer}."

    @classmethod
    def parse(cls, question: str) -> Query | None:
        """The query a question's wording states; None for wording no template writes."""
        if match := _SUBTRACT_COLOR.fullmatch(question):
            return cls(0, color=match.group(1))
        if match := _SUBTRACT_SHAPE.fullmatch(question):
            return cls(1, shape=match.group(1))
        if match := _ADD.fullmatch(question):
            return cls(2, color=match.group(2), shape=match.group(3), added=int(match.group(1)))
        return None


def make_question(scene: Scene, rng: random.Random) -> tuple[str, int, str]:
    """A question, its answer, and the teacher's rationale (without the answer line)."""
    template = rng.randrange(3)
    if template == 0:
        query = Query(0, color=rng.choice([c for _, c, _ in scene.objects]))
    elif template == 1:
        query = Query(1, shape=rng.choice(SHAPES))
    else:
        # the draws keep their order (shape, colour, number): every seed's dataset stays the same
        shape = rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        query = Query(2, color=color, shape=shape, added=rng.randint(1, 3))
    answer, steps = query.solve(scene)
    return query.question(), answer, steps


def single_edits(scene: Scene) -> tuple[list[Scene], list[Scene]]:
    """Every scene one object away from ``scene``: (one object removed, one object added to an
    empty cell, of any colour and shape)."""
    removed = [Scene(scene.objects[:i] + scene.objects[i + 1 :]) for i in range(len(scene.objects))]
    taken = {cell for cell, _, _ in scene.objects}
    added = [
        Scene(tuple(sorted((*scene.objects, (cell, color, shape)))))
        for cell in range(GRID * GRID) if cell not in taken
        for color in COLORS for shape in SHAPES
    ]
    return removed, added


@tasks.register("clevr-synth")
class ClevrSynth(SeededTask):
    name = "clevr-synth"
    split_sizes = SPLIT_SIZES
    split_offset = SPLIT_OFFSET
    seed_stride = 7_919
    cot_instruction = "First generate a step-by-step solution, then answer the question using a single numerical value."

    def scene(self, split: str, index: int) -> Scene:
        """The scene behind ``example(split, index)``: what is in each cell."""
        return make_scene(self.rng(split, index))

    def example(self, split: str, index: int) -> Example:
        rng = self.rng(split, index)
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

    def scene_of(self, example: Example) -> tuple[Scene, Query] | None:
        """The scene and query behind an example this task generated; None for any other example."""
        found = self.located(example)
        return None if found is None else (self.scene(*found), Query.parse(example.question))

    def gold_for_image(self, example: Example, other: Example) -> str | None:
        """The answer to ``example``'s question about ``other``'s scene, worked out from that scene."""
        query = Query.parse(example.question)
        found = self.scene_of(other)
        return None if query is None or found is None else str(query.solve(found[0])[0])

    def counterfactual(self, example: Example) -> Example | None:
        """The question about its scene with one object removed or added, so that its answer changes.

        The edit is drawn with a seed from the task's seed and the question id: removal or addition
        with equal chance (when both can change the answer), then one such edit. It keeps the scene
        within ``MIN_OBJECTS``..``MAX_OBJECTS`` objects and, for a colour question, keeps an object
        of the colour asked about, as every generated question has. The gold answer and the
        teacher's steps are worked out from the edited scene. None when the example is not one of
        this task's or no such edit changes the answer.
        """
        found = self.scene_of(example)
        if found is None:
            return None
        scene, query = found
        answer, _ = query.solve(scene)

        def fits(edited: Scene) -> bool:
            if not MIN_OBJECTS <= len(edited.objects) <= MAX_OBJECTS:
                return False
            if query.template == 0 and edited.count(color=query.color) == 0:
                return False
            return query.solve(edited)[0] != answer

        kinds = [options for options in ([s for s in group if fits(s)] for group in single_edits(scene)) if options]
        if not kinds:
            return None
        rng = seeded_rng(self.seed, "counterfactual", example.id)
        edited = rng.choice(rng.choice(kinds))
        new_answer, steps = query.solve(edited)
        return self.edited(example, render(edited), new_answer, steps, example.question.split()[0].lower())

    def check_steps(self, text: str, example: Example) -> bool:
        """Whether every step of a rationale holds in the example's scene: each "There are N ..."
        count is the scene's, and each "a + b = c" / "a - b = c" is right. A rationale with no
        step to check is not accepted: a right answer alone proves nothing about the reasoning."""
        split, index = example.id.rsplit("-", 1)
        scene = self.scene(split, int(index))
        claims = _COUNT_CLAIM.findall(text)
        equations = _EQUATION.findall(text)
        if not claims and not equations:
            return False
        for number, color, shape in claims:
            if int(number) != scene.count(color=color or None, shape=shape.rstrip("s") if shape != "objects" else None):
                return False
        return all((int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) for a, op, b, c in equations)


def corpus_lines() -> list[str]:
    """Text the tiny tokenizers are trained on: every clevr-synth prompt and rationale shape."""
    task = ClevrSynth()
    lines = []
    for i in range(300):
        ex = task.example("train", i)
        lines += [task.cot_prompt(ex), task.teacher_rationale(ex), task.select_instruction(ex)]
    return lines
