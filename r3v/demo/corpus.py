"""The built-in base model's pretraining text about clevr-synth scenes: what a real VLM brings from
pre-training (naming what is where, counting), written for the tiny model that has none of it."""

from __future__ import annotations

import random

from r3v.tasks.clevr_synth import COLORS, GRID, SHAPES, Scene


def cell_labels(scene: Scene) -> list[int]:
    """One class per grid cell, row by row: 0 for empty, else 1 + colour index * 2 + shape index."""
    labels = [0] * (GRID * GRID)
    for cell, color, shape in scene.objects:
        labels[cell] = 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)
    return labels


CELL_CLASSES = 1 + len(COLORS) * len(SHAPES)


def describe_counts(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A counting request about a scene and its answer, in the sentences the rationales use."""
    color = rng.choice([c for _, c, _ in scene.objects])
    shape = rng.choice(SHAPES)
    request = f"Count all objects, the {color} objects and the {shape}s."
    answer = (f"There are {len(scene.objects)} objects. There are {scene.count(color=color)} {color} objects. "
              f"There are {scene.count(shape=shape)} {shape}s.")
    return request, answer
