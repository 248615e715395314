"""An independent reading of clevr-synth: gold answers and rationale claims recounted from a scene.

clevr-synth writes each question and its answer from the same random draw (``make_question``), so
scoring a target against ``example.answer`` checks nothing about the arithmetic. These helpers
parse the question text with their own patterns and count the scene's objects directly; they use
nothing from ``r3v.tasks.clevr_synth`` but the scene's list of (cell, colour, shape) objects.
"""

from __future__ import annotations

import re

COLOURS = ("red", "blue", "green", "yellow")
SHAPES = ("square", "circle")

_REMOVE_COLOUR = re.compile(r"Subtract all (red|blue|green|yellow) objects\. How many objects are left\?")
_REMOVE_SHAPE = re.compile(r"Subtract all (square|circle)s\. How many objects are left\?")
_ADD = re.compile(r"Add (\d+) (red|blue|green|yellow) (square|circle)s\. How many (square|circle)s are there\?")
_CLAIM = re.compile(r"There are (\d+) (?:(red|blue|green|yellow) objects|(square|circle)s|objects)\.")


def count(objects, colour: str | None = None, shape: str | None = None) -> int:
    """Objects of a colour and/or shape, counted from the scene's (cell, colour, shape) triples."""
    total = 0
    for _cell, object_colour, object_shape in objects:
        if colour is not None and object_colour != colour:
            continue
        if shape is not None and object_shape != shape:
            continue
        total += 1
    return total


def recount(question: str, objects) -> tuple[str, int]:
    """(template, answer) of a clevr-synth question about a scene; fails on an unknown wording."""
    if match := _REMOVE_COLOUR.fullmatch(question):
        return "subtract-colour", len(objects) - count(objects, colour=match.group(1))
    if match := _REMOVE_SHAPE.fullmatch(question):
        return "subtract-shape", len(objects) - count(objects, shape=match.group(1))
    if match := _ADD.fullmatch(question):
        added, _colour, added_shape, asked_shape = match.groups()
        extra = int(added) if added_shape == asked_shape else 0
        return "add", count(objects, shape=asked_shape) + extra
    raise AssertionError(f"a clevr-synth question in no known wording: {question!r}")


def wrong_claims(text: str, objects) -> list[str]:
    """The "There are N <objects | colour objects | shapes>." sentences whose N is not the scene's count."""
    wrong = []
    for match in _CLAIM.finditer(text):
        claimed, colour, shape = int(match.group(1)), match.group(2), match.group(3)
        if claimed != count(objects, colour=colour, shape=shape):
            wrong.append(match.group(0))
    return wrong


def claimed_sentences(text: str) -> int:
    return len(_CLAIM.findall(text))
