"""clevr-synth: the same data on every machine, a different dataset per seed."""

from collections import Counter

import numpy as np

from r3v.tasks.clevr_synth import ClevrSynth


def test_examples_are_identical_across_instances_and_differ_by_seed():
    first, again, other = ClevrSynth(seed=0), ClevrSynth(seed=0), ClevrSynth(seed=1)
    for index in range(10):
        a, b = first.example("test", index), again.example("test", index)
        assert (a.question, a.answer, a.metadata) == (b.question, b.answer, b.metadata)
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert any(not np.array_equal(np.asarray(first.example("test", i).images[0]), np.asarray(other.example("test", i).images[0]))
               for i in range(10))


def test_splits_do_not_share_examples():
    task = ClevrSynth()
    seen = {split: {(ex.question, np.asarray(ex.images[0]).tobytes()) for ex in task.load(split, limit=200)}
            for split in ("train", "test", "pretrain")}
    assert not seen["train"] & seen["test"] and not seen["pretrain"] & seen["test"]


def test_scene_labels_and_count_descriptions_match_the_rendered_image():
    import random

    from r3v.demo.corpus import CELL_CLASSES, cell_labels, describe_counts
    from r3v.tasks.clevr_synth import CELL, COLORS, GRID

    task = ClevrSynth()
    for index in range(20):
        scene, image = task.scene("train", index), np.asarray(task.example("train", index).images[0])
        labels = cell_labels(scene)
        assert len(labels) == GRID * GRID and all(0 <= label < CELL_CLASSES for label in labels)
        assert sum(label > 0 for label in labels) == len(scene.objects)
        for cell, color, _shape in scene.objects:
            # the colour drawn at the cell's centre is the scene's colour for that cell
            row, col = divmod(cell, GRID)
            centre = image[row * CELL + CELL // 2, col * CELL + CELL // 2]
            assert tuple(int(v) for v in centre) == COLORS[color], (index, cell)
        request, answer = describe_counts(scene, random.Random(index))
        assert f"There are {len(scene.objects)} objects." in answer
        color = request.split("the ")[1].split()[0]
        assert f"There are {scene.count(color=color)} {color} objects." in answer


def test_gold_answers_recomputed_from_the_scene():
    """Every gold answer equals a count made here: the question parsed by the test's own patterns,
    the objects of ``task.scene`` counted one by one (``make_question`` is not involved). The
    teacher's rationale states the same counts, and the template recorded for the breakdown is
    the question's first word."""
    from clevr_oracle import claimed_sentences, recount, wrong_claims

    task = ClevrSynth()
    templates = Counter()
    for split in ("train", "test"):
        for index, example in enumerate(task.load(split, limit=300)):
            objects = task.scene(split, index).objects
            template, answer = recount(example.question, objects)
            assert example.answer == str(answer), (example.id, example.question)
            rationale = task.teacher_rationale(example)
            assert rationale.splitlines()[-1] == f"Answer: {answer}"
            assert claimed_sentences(rationale) >= 1 and wrong_claims(rationale, objects) == [], example.id
            assert example.metadata["template"] == example.question.split()[0].lower()
            templates[template] += 1
    # every template is exercised many times, so an error in any one of them shows
    assert set(templates) == {"subtract-colour", "subtract-shape", "add"} and min(templates.values()) > 100
