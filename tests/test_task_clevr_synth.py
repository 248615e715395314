"""clevr-synth: the same data on every machine, a different dataset per seed."""

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
