"""Reading warm-up CoT files (R3V JSON, distill JSONL) and the programmatic teacher."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from r3v.errors import DataError
from r3v.tasks.clevr_synth import ClevrSynth
from r3v.warmup import (
    distill_items,
    read_distill_jsonl,
    read_r3v_warmup,
    read_warmup_file,
    teacher_items,
)

TASK = ClevrSynth()


def with_images(shared_fixtures, tmp_path, name="clevr_math/gpt_cot_sample.json"):
    """Copy a warm-up file and create the image files it names (the fixtures ship without them)."""
    source = shared_fixtures / name
    target = tmp_path / source.name
    shutil.copy(source, target)
    (tmp_path / "images").mkdir()
    for record in json.loads(target.read_text()):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / record["image"])
    return target, json.loads(target.read_text())


def test_reads_r3v_clevr_warmup(shared_fixtures, tmp_path):
    path, records = with_images(shared_fixtures, tmp_path)
    items = read_r3v_warmup(path, image_root=tmp_path / "images")
    assert len(items) == len(records) == 20
    for item, record in zip(items, records, strict=True):
        user, assistant = record["conversations"]
        assert item.kind == "distill" and item.objective == "sft"
        assert item.prompt == user["value"].strip()
        assert item.target == assistant["value"].strip()
        assert item.images == [str((tmp_path / "images" / record["image"]).resolve())]
    assert len({item.example_id for item in items}) == 20


@pytest.mark.parametrize("name", ["r3v_warmup/chartqa_qwenvl_sft_gpt_sample.json", "r3v_warmup/tabmwp_qwenvl_sft_gpt_sample.json"])
def test_reads_other_r3v_warmup_files(shared_fixtures, name):
    items = read_r3v_warmup(shared_fixtures / name, check_images=False)
    assert len(items) == 20
    assert all("Answer:" in item.target for item in items)


def test_missing_image_names_file_and_record(shared_fixtures, tmp_path):
    path, records = with_images(shared_fixtures, tmp_path)
    (tmp_path / "images" / records[3]["image"]).unlink()
    with pytest.raises(DataError) as error:
        read_r3v_warmup(path, image_root=tmp_path / "images")
    assert error.value.path == str(path) and error.value.record == 3
    assert records[3]["image"] in str(error.value)


def write_json(tmp_path, data, name="warm.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    return path


GOOD = {"image": "ok.png", "conversations": [{"from": "user", "value": "Q?"}, {"from": "assistant", "value": "Answer: 1"}]}


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"image": "ok.png"}, "conversations"),
        ({**GOOD, "conversations": [GOOD["conversations"][1], GOOD["conversations"][0]]}, "user then assistant"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "assistant", "value": " "}]}, "non-empty"),
        ({**GOOD, "image": "../outside.png"}, "escapes"),
        ({**GOOD, "image": 7}, "'image' must be"),
        ("just a string", "expected an object"),
    ],
)
def test_malformed_records_name_file_and_record(tmp_path, bad, problem):
    path = write_json(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match=problem) as error:
        read_r3v_warmup(path)
    assert error.value.path == str(path) and error.value.record == 1


def test_whole_file_errors(tmp_path):
    not_list = write_json(tmp_path, {"a": 1})
    with pytest.raises(DataError, match="JSON list"):
        read_r3v_warmup(not_list)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": ')
    with pytest.raises(DataError, match="not valid JSON"):
        read_r3v_warmup(broken)
    with pytest.raises(DataError, match="not found"):
        read_warmup_file(tmp_path / "absent.json", {})


def test_image_placeholder_is_dropped_and_text_only_records_work(tmp_path):
    record = {"conversations": [{"from": "user", "value": "<image>Q?"}, {"from": "assistant", "value": "A"}]}
    items = read_r3v_warmup(write_json(tmp_path, [record]))
    assert items[0].prompt == "Q?" and items[0].images == []


def test_distill_jsonl(tmp_path):
    examples = {ex.id: ex for ex in TASK.load("train", limit=3)}
    lines = [
        {"example_id": "train-0", "prompt": "P0", "target": "T0\nAnswer: 1"},
        {"example_id": "train-2", "prompt": "P2", "target": "T2", "correct": False, "teacher": "x"},
        {"example_id": "train-1", "prompt": "P1", "target": "T1", "teacher": "x"},
    ]
    path = tmp_path / "distill.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_distill_jsonl(path, examples)
    assert [(i.kind, i.example_id, i.prompt, i.target, i.images) for i in items] == [
        ("distill", "train-0", "P0", "T0\nAnswer: 1", None),
        ("distill", "train-1", "P1", "T1", None),
    ]
    assert read_warmup_file(path, examples) == items


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"example_id": "train-9", "prompt": "P", "target": "T"}', "not a question"),
        ('{"example_id": "train-0", "prompt": "P"}', "'target'"),
        ('{"example_id": "train-0", "prompt": "P", "target": ', "malformed JSON"),
    ],
)
def test_distill_jsonl_errors_name_the_line(tmp_path, line, problem):
    examples = {ex.id: ex for ex in TASK.load("train", limit=3)}
    path = tmp_path / "distill.jsonl"
    path.write_text('{"example_id": "train-0", "prompt": "P", "target": "T"}\n' + line + "\n")
    with pytest.raises(DataError, match=problem) as error:
        read_distill_jsonl(path, examples)
    assert error.value.path == str(path) and error.value.record == "line 2"


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="expected R3V warm-up JSON"):
        read_warmup_file(path, {})


def test_programmatic_teacher_is_correct_and_capped():
    # The gold comes from recounting the scene (tests/clevr_oracle.py), not from ex.answer: the
    # teacher and ex.answer are written from the same draw, so agreeing with each other proves nothing.
    from clevr_oracle import claimed_sentences, recount, wrong_claims

    examples = TASK.load("train", limit=12)
    items = teacher_items(TASK, examples, count=5)
    assert [i.example_id for i in items] == [ex.id for ex in examples[:5]]
    for index, (item, ex) in enumerate(zip(items, examples[:5], strict=True)):
        objects = TASK.scene("train", index).objects
        _, gold = recount(ex.question, objects)
        assert item.prompt.startswith(ex.question + "\n")
        assert item.target.splitlines()[-1] == f"Answer: {gold}"
        assert TASK.extract(item.target, ex) == str(gold)
        # every count the rationale states is the scene's
        assert claimed_sentences(item.target) >= 1 and wrong_claims(item.target, objects) == []
    assert distill_items(TASK, examples, teacher_count=5) == items


def test_file_overrides_the_teacher(tmp_path):
    examples = TASK.load("train", limit=2)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"example_id": "train-1", "prompt": "P", "target": "T"}) + "\n")
    assert [i.example_id for i in distill_items(TASK, examples, warmup_file=path)] == ["train-1"]


def test_distill_jsonl_of_another_task_is_refused(tmp_path):
    examples = {ex.id: ex for ex in TASK.load("train", limit=2)}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"example_id": "train-0", "task": "geoqa", "prompt": "P", "target": "T"}) + "\n")
    with pytest.raises(DataError, match="written for task 'geoqa'"):
        read_warmup_file(path, examples, task_name="clevr-synth")
    assert len(read_warmup_file(path, examples)) == 1  # no task known: nothing to compare
