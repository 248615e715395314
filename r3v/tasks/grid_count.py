"""``grid-count``: count the objects of a kind on a grid, row by row, with a running total.

Each image is a 4x4 grid of 28 px cells (112 px, one Qwen2-VL image token per cell) holding
coloured squares and circles. A question asks how many objects of a colour, a shape, or both
there are. The teacher's rationale walks the four rows, and each step is local: what the row holds
(its four cells, read left to right), each object marked "yes" if the question asks about it and
"no" if not, how many "yes" the row has, and the running total so far (for "How many red objects
are there?")::

    Row 1: red circle yes, empty, blue square no, empty; 1, total 1. Row 2: empty, empty, empty,
    green square no; 0, total 1. Row 3: red square yes, empty, green circle no, red circle yes;
    2, total 3. Row 4: empty, yellow circle no, red circle yes, empty; 1, total 4.
    Answer: 4

The marks are why: a tiny model that reads every row still cannot relate a row's objects to the
question in one step (its row counts are right about as often as always writing the commonest
count), while marking one object at a time, then counting marks, is a step it learns
(``benchmarks/README.md``, "grid-count").

So every step can be learnt from right samples and checked against the scene (``check_steps``):
a misread row, a wrong mark, a miscounted row or a wrong sum leaves a visible trace, even when
the final answer happens to be right. Everything derives from (split, index, seed), so the data
is identical on every machine. Scenes are drawn as clevr-synth's are (its ``Scene`` and
``render``); answers are integers, extracted and scored as clevr-synth's (CLEVR-Math's rule).
The shortcut probes work here too: ``gold_for_image`` and ``counterfactual`` (one object added
or removed).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from r3v.records import Example
from r3v.registry import tasks
from r3v.seeds import seeded_rng
from r3v.tasks.base import SeededTask
from r3v.tasks.clevr_synth import COLORS, GRID, SHAPES, Scene, render, single_edits

#: Objects per scene: dense enough that most rows hold something to count.
MIN_OBJECTS, MAX_OBJECTS = 5, 12
#: ``pretrain`` is for a base model's warm-up; the R3V loop uses train and test.
SPLIT_SIZES = {"train": 1000, "test": 300, "pretrain": 4000}
#: Far apart, and apart from clevr-synth's, so no split of one seed repeats another's scenes.
SPLIT_OFFSET = {"train": 0, "test": 1_000_033, "pretrain": 2_000_029}
#: Question templates, named for the breakdown: by colour, by shape, by colour and shape.
TEMPLATES = ("colour", "shape", "colour-shape")

_ANSWER_INT = re.compile(r"Answer:\s*(-?\d+)")
#: One step of a rationale: "Row 2: red circle yes, empty, empty, blue square no; 1, total 3."
_STEP = re.compile(r"Row (\d+): ([a-z ,]+); (\d+), total (\d+)\.")
#: What a step says an empty cell holds.
EMPTY = "empty"
#: What a step writes after an object the question asks about, and after one it does not.
YES, NO = "yes", "no"
_QUESTION = re.compile(
    rf"How many (?:({'|'.join(COLORS)}) )?(objects|{'|'.join(f'{s}s' for s in SHAPES)}) are there\?"
)


def row_text(scene: Scene, row: int) -> str:
    """What a row (0-based) holds, cell by cell from the left, as the rationales say it:
    "empty, red circle, empty, blue square"."""
    held = {cell: f"{color} {shape}" for cell, color, shape in scene.objects}
    return ", ".join(held.get(row * GRID + col, EMPTY) for col in range(GRID))


def mark(asked: bool) -> str:
    """The word a step writes after an object: ``YES`` if the question asks about it."""
    return YES if asked else NO


@dataclass(frozen=True)
class Query:
    """What a question asks for: a colour, a shape, or both (None: any)."""

    color: str | None = None
    shape: str | None = None

    def matches(self, color: str, shape: str) -> bool:
        return (self.color is None or color == self.color) and (self.shape is None or shape == self.shape)

    @property
    def template(self) -> str:
        return "colour-shape" if self.color and self.shape else "colour" if self.color else "shape"

    def question(self) -> str:
        noun = f"{self.shape}s" if self.shape else "objects"
        return f"How many {self.color + ' ' if self.color else ''}{noun} are there?"

    def marked_row(self, scene: Scene, row: int) -> str:
        """What a row (0-based) holds, each object marked for this query, as the rationales say it:
        "empty, red circle yes, empty, blue square no"."""
        held = {cell: f"{color} {shape} {mark(self.matches(color, shape))}" for cell, color, shape in scene.objects}
        return ", ".join(held.get(row * GRID + col, EMPTY) for col in range(GRID))

    def row_counts(self, scene: Scene) -> list[int]:
        """How many matching objects each row holds, top to bottom."""
        counts = [0] * GRID
        for cell, color, shape in scene.objects:
            if self.matches(color, shape):
                counts[cell // GRID] += 1
        return counts

    def solve(self, scene: Scene) -> tuple[int, str]:
        """The answer about ``scene`` and the teacher's rationale (without the answer line)."""
        total, steps = 0, []
        for row, count in enumerate(self.row_counts(scene)):
            total += count
            steps.append(f"Row {row + 1}: {self.marked_row(scene, row)}; {count}, total {total}.")
        return total, " ".join(steps)

    @classmethod
    def parse(cls, question: str) -> Query | None:
        """The query a question's wording states; None for wording no template writes."""
        match = _QUESTION.fullmatch(question)
        if not match:
            return None
        noun = match.group(2)
        return cls(color=match.group(1), shape=None if noun == "objects" else noun[:-1])


@dataclass(frozen=True)
class StepOutcome:
    """One written step judged on its own, so a diagnosis can say which kind of step fails."""

    row: int
    #: The row's cells, left to right, are the scene's (marks aside).
    read: bool
    #: Every object written carries a mark, and it is right for the object the step itself wrote
    #: (right or misread): "yes" exactly when the question asks about it.
    marked: bool
    #: The count is the number of "yes" marks the step wrote.
    counted: bool
    #: The total is the previous step's total (0 before the first) plus this step's count.
    summed: bool
    #: How many asked-for objects the row truly holds (None for a row number outside the grid).
    right_count: int | None = None


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    return Scene(tuple((cell, rng.choice(list(COLORS)), rng.choice(SHAPES)) for cell in cells))


def make_query(scene: Scene, rng: random.Random) -> Query:
    """A question about the scene: a colour in it, a shape, or a colour and shape (possibly absent)."""
    template = rng.randrange(len(TEMPLATES))
    if template == 0:
        return Query(color=rng.choice([c for _, c, _ in scene.objects]))
    if template == 1:
        return Query(shape=rng.choice(SHAPES))
    return Query(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES))


def parse_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The (row, what it holds, count, total) steps written in a rationale, in order."""
    return [(int(row), held.strip(), int(count), int(total)) for row, held, count, total in _STEP.findall(text)]


@tasks.register("grid-count")
class GridCount(SeededTask):
    name = "grid-count"
    cot_instruction = "Count row by row, keeping a running total, then answer with a single number."
    split_sizes, split_offset, seed_stride = SPLIT_SIZES, SPLIT_OFFSET, 7_907

    def scene_and_query(self, split: str, index: int) -> tuple[Scene, Query]:
        """The scene behind ``example(split, index)`` and what its question asks."""
        rng = self.rng(split, index)
        scene = make_scene(rng)
        return scene, make_query(scene, rng)

    def scene(self, split: str, index: int) -> Scene:
        return self.scene_and_query(split, index)[0]

    def example(self, split: str, index: int) -> Example:
        scene, query = self.scene_and_query(split, index)
        answer, steps = query.solve(scene)
        return Example(
            id=f"{split}-{index}",
            task=self.name,
            question=query.question(),
            answer=str(answer),
            images=[render(scene)],
            metadata={"rationale": steps, "template": query.template},
        )

    def _found(self, example: Example) -> tuple[Scene, Query] | None:
        found = self.located(example)
        return None if found is None else self.scene_and_query(*found)

    def gold_for_image(self, example: Example, other: Example) -> str | None:
        """The answer to ``example``'s question about ``other``'s scene, worked out from that scene."""
        query = Query.parse(example.question)
        found = self._found(other)
        return None if query is None or found is None else str(query.solve(found[0])[0])

    def counterfactual(self, example: Example) -> Example | None:
        """The question about its scene with one object removed or added (drawn with a seed from
        the task's seed and the question id), so that its answer changes; the edited scene keeps
        ``MIN_OBJECTS``..``MAX_OBJECTS`` objects. None for an example that is not this task's."""
        found = self._found(example)
        if found is None:
            return None
        scene, query = found
        answer = query.solve(scene)[0]
        edits = [edited for group in single_edits(scene) for edited in group
                 if MIN_OBJECTS <= len(edited.objects) <= MAX_OBJECTS and query.solve(edited)[0] != answer]
        if not edits:
            return None
        edited = seeded_rng(self.seed, "counterfactual", example.id).choice(edits)
        new_answer, steps = query.solve(edited)
        return self.edited(example, render(edited), new_answer, steps, query.template)

    def step_outcomes(self, text: str, example: Example) -> list[StepOutcome] | None:
        """Each written step of a rationale judged on its own (see ``StepOutcome``), in the order
        written; None for a scene this task did not make."""
        found = self._found(example)
        if found is None:
            return None
        scene, query = found
        outcomes, previous_total, right_counts = [], 0, query.row_counts(scene)
        for row, held, count, total in parse_steps(text):
            cells = [cell.split() for cell in held.split(", ")]
            objects = [cell for cell in cells if cell != [EMPTY]]
            outcomes.append(StepOutcome(
                row=row,
                read=1 <= row <= GRID and ", ".join(" ".join(cell[:2]) for cell in cells) == row_text(scene, row - 1),
                marked=all(len(cell) == 3 and cell[0] in COLORS and cell[1] in SHAPES
                           and cell[2] == mark(query.matches(cell[0], cell[1])) for cell in objects),
                counted=count == sum(cell[-1] == YES for cell in objects),
                summed=total == previous_total + count,
                right_count=right_counts[row - 1] if 1 <= row <= GRID else None,
            ))
            previous_total = total
        return outcomes

    def check_steps(self, text: str, example: Example) -> bool:
        """Whether every step of a rationale holds in the example's scene: it walks rows 1 to 4 in
        order, each row's objects are the scene's (left to right), each object's mark says rightly
        whether the question asks about it, each count is the row's number of "yes", each running total is the true one, and an answer line, if any, gives the
        last total. A rationale with no step (or about a scene this task
        did not make) is not accepted: a right answer alone proves nothing about the reasoning."""
        outcomes = self.step_outcomes(text, example)
        if outcomes is None or [step.row for step in outcomes] != list(range(1, GRID + 1)):
            return False
        # rows 1 to 4 each read, marked, counted and added right make every count and total the true one
        if not all(step.read and step.marked and step.counted and step.summed for step in outcomes):
            return False
        answer = _ANSWER_INT.search(text)
        return answer is None or int(answer.group(1)) == parse_steps(text)[-1][3]
