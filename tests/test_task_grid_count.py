"""grid-count: gold answers and step checks against what the rendered image shows.

The oracle here reads each cell from the pixels (its centre colour; a square's corner is filled,
a circle's is not) and parses the question with its own pattern, and writes each object's mark
itself, so neither ``Query`` nor ``row_text`` is involved in what the task is checked against.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from r3v.tasks.clevr_synth import CELL, COLORS, GRID
from r3v.tasks.grid_count import GridCount

QUESTION = re.compile(r"How many (?:(\w+) )?(objects|squares|circles) are there\?")


def read_cells(image) -> list[str]:
    """Each cell of a rendered grid, row by row, as "empty" or "<colour> <shape>", from its pixels."""
    pixels = np.asarray(image)
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    cells = []
    for row in range(GRID):
        for col in range(GRID):
            y, x = row * CELL, col * CELL
            centre = tuple(int(v) for v in pixels[y + CELL // 2, x + CELL // 2])
            if centre not in by_rgb:
                cells.append("empty")
                continue
            corner = tuple(int(v) for v in pixels[y + 5, x + 5])  # inside a square's box, outside a circle
            cells.append(f"{by_rgb[centre]} {'square' if corner == centre else 'circle'}")
    return cells


def matches(cell: str, color: str | None, noun: str) -> bool:
    if cell == "empty":
        return False
    cell_color, shape = cell.split()
    return (color is None or cell_color == color) and (noun == "objects" or f"{shape}s" == noun)


def marked(cells: list[str], color: str | None, noun: str) -> str:
    """Cells as a step writes them: each object followed by "yes" if the question asks about it, else "no"."""
    return ", ".join(cell if cell == "empty" else f"{cell} {'yes' if matches(cell, color, noun) else 'no'}"
                     for cell in cells)


def oracle_rationale(question: str, image) -> tuple[str, int]:
    """The row-by-row rationale and the answer, from the pixels and the question's wording."""
    color, noun = QUESTION.fullmatch(question).groups()
    cells, total, steps = read_cells(image), 0, []
    for row in range(GRID):
        held = cells[row * GRID:(row + 1) * GRID]
        count = sum(matches(cell, color, noun) for cell in held)
        total += count
        steps.append(f"Row {row + 1}: {marked(held, color, noun)}; {count}, total {total}.")
    return " ".join(steps), total


def test_gold_answers_and_teacher_steps_are_what_the_image_shows():
    task = GridCount()
    templates = Counter()
    for split in ("train", "test"):
        for example in task.load(split, limit=150):
            steps, answer = oracle_rationale(example.question, example.images[0])
            assert example.answer == str(answer), example.id
            assert task.teacher_rationale(example) == f"{steps}\nAnswer: {answer}", example.id
            templates[example.metadata["template"]] += 1
    assert set(templates) == {"colour", "shape", "colour-shape"} and min(templates.values()) > 40
    # the answers spread out, so a constant guess is far from the gold
    assert Counter(ex.answer for ex in task.load("test")).most_common(1)[0][1] < 0.35 * task.sizes["test"]


def test_data_is_identical_across_instances_differs_by_seed_and_splits_are_disjoint():
    first, again, other = GridCount(), GridCount(), GridCount(seed=1)
    for index in range(10):
        a, b = first.example("test", index), again.example("test", index)
        assert (a.question, a.answer, a.metadata) == (b.question, b.answer, b.metadata)
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert any(first.example("test", i).images[0].tobytes() != other.example("test", i).images[0].tobytes()
               for i in range(10))
    seen = {split: {np.asarray(ex.images[0]).tobytes() for ex in first.load(split, limit=300)}
            for split in ("train", "test", "pretrain")}
    assert not seen["train"] & seen["test"] and not seen["pretrain"] & seen["test"]


def _replace_step(text: str, row: int, new_step: str) -> str:
    steps = re.findall(r"Row \d+: [^;]+; \d+, total \d+\.", text)
    return text.replace(steps[row], new_step)


@pytest.mark.parametrize("index", range(12))
def test_step_checker_accepts_right_steps_and_rejects_each_kind_of_wrong_step(index):
    task = GridCount()
    example = task.example("test", index)
    teacher = task.teacher_rationale(example)
    assert task.check_steps(teacher, example)
    assert task.check_steps(teacher.rsplit("\n", 1)[0], example)  # steps alone, no answer line
    cells = read_cells(example.images[0])
    color, noun = QUESTION.fullmatch(example.question).groups()
    first_row = cells[:GRID]
    row_one = marked(first_row, color, noun)
    count = sum(matches(cell, color, noun) for cell in first_row)
    # a misread cell: an empty cell read as an object, or an object read as empty
    misread = list(first_row)
    misread[0] = "empty" if misread[0] != "empty" else "blue circle"
    misread_count = sum(matches(cell, color, noun) for cell in misread)
    text = f"Row 1: {marked(misread, color, noun)}; {misread_count}, total {misread_count}."
    assert not task.check_steps(_replace_step(teacher, 0, text), example)
    # the row read right but counted wrong, the running total carried on consistently from there
    wrong = _replace_step(teacher, 0, f"Row 1: {row_one}; {count + 1}, total {count + 1}.")
    assert not task.check_steps(wrong, example)
    # a row count that disagrees with its row, though the running total is right
    assert not task.check_steps(_replace_step(teacher, 0, f"Row 1: {row_one}; {count + 1}, total {count}."), example)
    # the objects without their marks, though the row, its count and the total are right
    assert not task.check_steps(_replace_step(teacher, 0, f"Row 1: {', '.join(first_row)}; {count}, total {count}."), example)
    # the right contents under a wrong row number
    assert not task.check_steps(teacher.replace("Row 2:", "Row 1:", 1), example)
    # a wrong sum: the last total off by one
    last = re.findall(r"Row 4: [^;]+; (\d+), total (\d+)\.", teacher)[0]
    off = _replace_step(teacher, 3, f"Row 4: {marked(cells[12:], color, noun)}; {last[0]}, total {int(last[1]) + 1}.")
    assert not task.check_steps(off, example)
    # an answer line that disagrees with the steps, a skipped row, rows out of order, no steps
    assert not task.check_steps(f"{teacher.rsplit(chr(10), 1)[0]}\nAnswer: {int(example.answer) + 1}", example)
    steps = re.findall(r"Row \d+: [^;]+; \d+, total \d+\.", teacher)
    assert not task.check_steps(" ".join(steps[:2] + steps[3:]), example)
    assert not task.check_steps(" ".join([steps[1], steps[0], *steps[2:]]), example)
    assert not task.check_steps(f"Answer: {example.answer}", example)


@pytest.mark.parametrize("index", range(6))
def test_step_outcomes_name_the_kind_of_step_that_fails(index):
    """A misread row, a wrong mark, a count that is not the number of "yes" written, and a wrong
    sum each fail only their own part; a misread object marked and counted right for what was
    written counts as marked and counted."""
    task = GridCount()
    example = task.example("test", index)
    teacher = task.teacher_rationale(example)
    cells = read_cells(example.images[0])
    color, noun = QUESTION.fullmatch(example.question).groups()
    first_row = cells[:GRID]
    row_one = marked(first_row, color, noun)
    count = sum(matches(cell, color, noun) for cell in first_row)

    def first_step(text):
        outcome = task.step_outcomes(text, example)[0]
        return outcome.read, outcome.marked, outcome.counted, outcome.summed

    assert [(o.row, o.read, o.marked, o.counted, o.summed) for o in task.step_outcomes(teacher, example)] == [
        (row, True, True, True, True) for row in range(1, GRID + 1)]
    assert [o.right_count for o in task.step_outcomes(teacher, example)] == [
        sum(matches(cell, color, noun) for cell in cells[row * GRID:(row + 1) * GRID]) for row in range(GRID)]
    miscounted = _replace_step(teacher, 0, f"Row 1: {row_one}; {count + 1}, total {count + 1}.")
    assert first_step(miscounted) == (True, True, False, True)
    missummed = _replace_step(teacher, 0, f"Row 1: {row_one}; {count}, total {count + 1}.")
    assert first_step(missummed) == (True, True, True, False)
    # an object the question asks about read as empty, and marked and counted as what was written
    asked = next((i for i, cell in enumerate(first_row) if matches(cell, color, noun)), None)
    if asked is not None:
        misread = list(first_row)
        misread[asked] = "empty"
        text = _replace_step(teacher, 0, f"Row 1: {marked(misread, color, noun)}; {count - 1}, total {count - 1}.")
        assert first_step(text) == (False, True, True, True)
        assert not task.check_steps(text, example)
    # an object's mark flipped, the count following the marks written: only the mark is wrong
    present = next((i for i, cell in enumerate(first_row) if cell != "empty"), None)
    if present is not None:
        parts = row_one.split(", ")
        flipped = parts[present].rsplit(" ", 1)[1] == "no"
        parts[present] = f"{first_row[present]} {'yes' if flipped else 'no'}"
        written = count + (1 if flipped else -1)
        text = _replace_step(teacher, 0, f"Row 1: {', '.join(parts)}; {written}, total {written}.")
        assert first_step(text) == (True, False, True, True)
        assert not task.check_steps(text, example)
    from r3v.tasks.clevr_synth import ClevrSynth

    assert task.step_outcomes(teacher, ClevrSynth().example("test", index)) is None  # not this task's scene


def test_a_right_answer_with_a_wrong_step_is_not_accepted():
    """The point of checking steps: a rationale can reach the gold answer through two errors that
    cancel, and the final-answer metric counts it right."""
    task = GridCount()
    for index in range(200):
        example = task.example("test", index)
        counts = [int(c) for c in re.findall(r"; (\d+), total", example.metadata["rationale"])]
        if counts[0] >= 1:
            break
    steps = re.findall(r"Row (\d+): ([^;]+); (\d+), total (\d+)\.", example.metadata["rationale"])
    shifted, total = [], 0
    for position, (row, held, count, _) in enumerate(steps):
        # one too few in row 1, one too many in row 2: the same total at the end
        count = int(count) - (position == 0) + (position == 1)
        total += count
        shifted.append(f"Row {row}: {held}; {count}, total {total}.")
    text = " ".join(shifted) + f"\nAnswer: {total}"
    assert task.is_correct(task.extract(text, example), example)
    assert not task.check_steps(text, example)


def test_steps_about_another_seed_or_task_are_not_accepted():
    task, other_seed = GridCount(), GridCount(seed=1)
    example = other_seed.example("test", 0)
    mine = task.example("test", 0)
    if example.question != mine.question or example.answer != mine.answer:
        assert not task.check_steps(other_seed.teacher_rationale(example), example)
    stranger = mine.__class__(id="q-1", task="other", question=mine.question, answer=mine.answer, images=mine.images)
    assert not task.check_steps(task.teacher_rationale(mine), stranger)


def test_probes_get_their_gold_from_the_edited_or_swapped_image():
    task = GridCount()
    edited_any = 0
    for index in range(30):
        example, other = task.example("test", index), task.example("test", index + 1)
        assert task.gold_for_image(example, other) == str(oracle_rationale(example.question, other.images[0])[1])
        edit = task.counterfactual(example)
        if edit is None:
            continue
        edited_any += 1
        assert edit.answer != example.answer and edit.question == example.question
        assert edit.answer == str(oracle_rationale(edit.question, edit.images[0])[1])
        differing = sum(a != b for a, b in zip(read_cells(example.images[0]), read_cells(edit.images[0]), strict=True))
        assert differing == 1
    assert edited_any >= 25


def test_the_binding_probe_asks_right_answers_and_sets_its_bar_at_the_commoner_one(tmp_path, load_module):
    """benchmarks/grid_binding.py: each item's answer is what the question's own wording says about
    the object (read here with this file's pattern), and a probe's bar is the commoner answer."""
    grid_binding = load_module("benchmarks/grid_binding.py")
    items = grid_binding.binding_items(300, seed=5)
    assert items == grid_binding.binding_items(300, seed=5) != grid_binding.binding_items(300, seed=6)
    for template, prompt, answer in items:
        question, asked = prompt.split("\n")
        color, noun = QUESTION.fullmatch(question).groups()
        cell = re.fullmatch(r"Is a (\w+ \w+) one\?", asked).group(1)
        assert answer == ("yes" if matches(cell, color, noun) else "no"), prompt
        assert template == ("colour-shape" if color and noun != "objects" else "colour" if color else "shape")
    assert {t for t, _, _ in items} == {"colour", "shape", "colour-shape"}
    assert 0.2 < sum(a == "yes" for _, _, a in items) / len(items) < 0.5
    held_out = items[:40]
    result = grid_binding.probe("2x64", items[40:104], held_out, epochs=1.0, learning_rate=5e-4, work=tmp_path)
    answers = Counter(a for _, _, a in held_out)
    assert result["commoner_answer"] == round(answers.most_common(1)[0][1] / 40, 4)
    assert result["steps"] == 2 and 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["said_yes"] <= 1.0
    assert sum(part["items"] for part in result["by_template"].values()) == 40


def test_dev_runs_step_parts_count_each_kind_of_wrong_step_over_the_steps_written(load_module):
    """benchmarks/dev_runs.py's shares per kind of step, over rationales with known faults: the
    teacher's, one with a mark flipped (the count following it), one without marks."""
    dev_runs = load_module("benchmarks/dev_runs.py")
    task = GridCount()
    examples = {ex.id: ex for ex in task.load("test", limit=30)}
    rows, flipped_steps, unmarked_steps, unmarked_counts_wrong = [], 0, 0, 0
    for example in examples.values():
        teacher = task.teacher_rationale(example)
        color, noun = QUESTION.fullmatch(example.question).groups()
        cells = read_cells(example.images[0])
        first_row = cells[:GRID]
        rows.append({"example_id": example.id, "text": teacher})
        present = [i for i, cell in enumerate(first_row) if cell != "empty"]
        if present:  # the first object's mark flipped, the row's count and every total following it
            count = sum(matches(cell, color, noun) for cell in first_row)
            parts = marked(first_row, color, noun).split(", ")
            was_yes = parts[present[0]].endswith(" yes")
            parts[present[0]] = f"{first_row[present[0]]} {'no' if was_yes else 'yes'}"
            new_count = count - 1 if was_yes else count + 1
            steps = re.findall(r"Row \d+: [^;]+; \d+, total \d+\.", teacher)
            totals = [int(t) for t in re.findall(r"total (\d+)\.", teacher)]
            shifted = [f"Row 1: {', '.join(parts)}; {new_count}, total {new_count}."]
            for step, total in zip(steps[1:], totals[1:], strict=True):
                shifted.append(re.sub(r"total \d+\.", f"total {total + new_count - count}.", step))
            rows.append({"example_id": example.id, "text": " ".join(shifted)})
            flipped_steps += 1
        # every object's mark dropped: each row holding an object is unmarked
        unmarked = re.sub(r" (yes|no)\b", "", teacher)
        rows.append({"example_id": example.id, "text": unmarked})
        unmarked_steps += sum(any(cell != "empty" for cell in cells[r * GRID:(r + 1) * GRID]) for r in range(GRID))
        # it writes no "yes", so its count is right only for a row holding nothing asked about
        unmarked_counts_wrong += sum(any(matches(cell, color, noun) for cell in cells[r * GRID:(r + 1) * GRID])
                                     for r in range(GRID))
    written = 4 * len(rows)
    shares = dev_runs.step_parts(rows, task, examples)
    assert flipped_steps > 20
    assert shares["test_steps_read"] == 1.0 and shares["test_steps_summed"] == 1.0
    assert shares["test_steps_marked"] == round(1 - (flipped_steps + unmarked_steps) / written, 4)
    assert shares["test_steps_counted"] == round(1 - unmarked_counts_wrong / written, 4) < 1.0
    assert dev_runs.step_parts(rows, GridCount(seed=1), examples) != shares
