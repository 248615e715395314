"""MiniWob: SeeClick's step format, the action parser, the offline step judge, loading and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from task_helpers import copy_with_edit

from r3v.errors import DataError
from r3v.registry import tasks
from r3v.tasks.miniwob import MiniWob, parse_action

FIXTURES = Path(__file__).parent / "fixtures" / "miniwob"


@pytest.fixture(scope="module")
def task() -> MiniWob:
    return MiniWob()


def step(kind: str = "click", bbox=(20, 80, 70, 100), typed: str = "", **extra) -> dict:
    return {"task_name": "click-button", "goal": "Click on the button.", "action_type": kind, "bbox": list(bbox),
            "typed_text": typed, **extra}


def test_registered():
    assert tasks.get("miniwob") is MiniWob


# --- the action parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"action_type": 4, "click_point": [0.28, 0.43]}', {"action_type": 4, "click_point": [0.28, 0.43]}),
        # SeeClick writes the point as a Python tuple
        ('Click it.\n{"action_type": 4, "click_point": (0.49,0.50)}', {"action_type": 4, "click_point": [0.49, 0.5]}),
        ('{"action_type": 3, "typed_text": "Kevin {x}"}', {"action_type": 3, "typed_text": "Kevin {x}"}),
        # the last action counts
        ('{"action_type": 3, "typed_text": "a"} no, rather {"action_type": 4, "click_point": [0, 1]}',
         {"action_type": 4, "click_point": [0.0, 1.0]}),
        ('{"action_type": 4, "click_point": [0.1, 0.2]} then {"note": 1}', {"action_type": 4, "click_point": [0.1, 0.2]}),
        ('{"action_type": 4, "click_point": [0.1]}', None),
        ('{"action_type": 4, "click_point": [true, 0.2]}', None),
        ('{"action_type": 4, "click_point": [1e999, 0.2]}', None),
        ('{"action_type": 2, "click_point": [0.1, 0.2]}', None),
        ('{"action_type": 3, "typed_text": 5}', None),
        ('{"action_type": 4, "click_point": [0.1, 0.2]', None),
        ("click the submit button", None),
        ("", None),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


# --- the offline step judge ------------------------------------------------------------------------


def test_click_inside_and_outside_bbox(task):
    example = task.example_from_record(step(bbox=(20, 80, 70, 100)), 0)  # x 0.125-0.4375, y 0.381-0.476
    inside = '{"action_type": 4, "click_point": [0.3, 0.43]}'
    assert task.is_correct(task.extract("Reasoning.\n" + inside, example), example)
    for x, y in [(0.5, 0.43), (0.3, 0.5), (0.1, 0.43), (0.3, 0.3)]:
        assert not task.is_correct(f'{{"action_type": 4, "click_point": [{x}, {y}]}}', example)
    # the bbox edges count as inside
    assert task.is_correct('{"action_type": 4, "click_point": [0.125, 0.4]}', example)
    assert not task.is_correct('{"action_type": 3, "typed_text": "Submit"}', example)
    assert not task.is_correct(None, example)


def test_typed_text(task):
    example = task.example_from_record(step("type", typed="Kevin"), 0)
    assert task.is_correct('{"action_type": 3, "typed_text": "  kevin "}', example)
    assert not task.is_correct('{"action_type": 3, "typed_text": "Kevi"}', example)
    assert not task.is_correct('{"action_type": 4, "click_point": [0.3, 0.43]}', example)


def test_normalize_groups_equivalent_actions(task):
    example = task.example_from_record(step(), 0)
    a = task.normalize('{"action_type": 4, "click_point": [0.281, 0.434]}', example)
    b = task.normalize('{"action_type": 4, "click_point": (0.279,0.43)}', example)
    assert a == b == '{"action_type": 4, "click_point": [0.28, 0.43]}'
    assert task.normalize('{"action_type": 4, "click_point": [-0.001, 0.2]}', example) == task.normalize(
        '{"action_type": 4, "click_point": [0.001, 0.2]}', example
    )
    assert task.normalize('{"action_type": 3, "typed_text": " Kevin"}', example) == task.normalize(
        '{"action_type": 3, "typed_text": "kevin "}', example
    )
    assert task.normalize(a, example) == a


# --- loading and prompts ---------------------------------------------------------------------------


def test_load_steps_and_history(task):
    examples = task.load("train", data_dir=FIXTURES)
    data = json.loads((FIXTURES / "miniwob_data_train.json").read_text())
    assert len(examples) == sum(len(ep) for eps in data.values() for ep in eps)
    by_id = {e.id: e for e in examples}
    typing = by_id["enter-text-0-1"]
    assert typing.metadata["action_type"] == "type" and typing.metadata["typed_text"] == "Kevin"
    assert typing.metadata["previous_actions"] == [by_id["enter-text-0-0"].answer]
    # the history keeps the last four gold actions, renumbered from Step0 as SeeClick does
    last = by_id["click-checkboxes-0-5"]
    earlier = [by_id[f"click-checkboxes-0-{k}"].answer for k in range(1, 5)]
    assert last.metadata["previous_actions"] == earlier
    goal = data["click-checkboxes"][0][5]["goal"]
    history = "".join(f"Step{i}: {a}. " for i, a in enumerate(earlier))
    assert task.qa_prompt(last) == (
        "Please generate the next move according to the ui screenshot, instruction and previous actions. "
        f"Instruction: {goal}. Previous actions: {history}"
    )
    assert task.cot_prompt(last).startswith(task.qa_prompt(last) + "\nFirst think step by step")
    assert by_id["click-button-0-0"].metadata["previous_actions"] == []
    assert all(Path(e.images[0]).is_file() for e in examples)
    assert examples[0].load_images()[0].size == (160, 210)
    # every gold action is read as correct
    assert all(task.is_correct(task.extract(task.answer_line(e.answer, e), e), e) for e in examples)
    assert len(task.load("train", data_dir=FIXTURES, limit=3)) == 3


def _copy(tmp_path: Path, mutate) -> Path:
    return copy_with_edit(FIXTURES, tmp_path / "miniwob", "miniwob_data_train.json", mutate)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda d: d["enter-text"][0][1].update(action_type="scroll"), "action_type should be 'click' or 'type'"),
        (lambda d: d["enter-text"][0][1].update(typed_text=None), "needs field 'typed_text'"),
        (lambda d: d["enter-text"][0][0].update(bbox=[50, 60, 10, 80]), "x1 > x2"),
        (lambda d: d["enter-text"][0][0].update(img_filename="gone.png"), "screenshot not found"),
        (lambda d: d["enter-text"][0][0].update(img_filename="../../x.png"), "escapes the data root"),
    ],
)
def test_bad_step_names_file_and_record(tmp_path, mutate, problem):
    root = _copy(tmp_path, mutate)
    with pytest.raises(DataError) as info:
        MiniWob().load("train", data_dir=root)
    assert problem in str(info.value) and "miniwob_data_train.json" in str(info.value) and "enter-text[0][" in str(info.value)
    lenient = MiniWob(skip_bad=True)
    assert len(lenient.load("train", data_dir=root)) == 9
    assert len(lenient.bad_records) == 1


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="miniwob_data_test.json not found"):
        MiniWob().load("test", data_dir=FIXTURES)
    with pytest.raises(DataError, match="needs --data-dir"):
        MiniWob().load("train")
    (tmp_path / "miniwob_data_train.json").write_text('{"click-button": [[')
    with pytest.raises(DataError, match="not valid JSON"):
        MiniWob().load("train", data_dir=tmp_path)
    (tmp_path / "miniwob_data_train.json").write_text("[]")
    with pytest.raises(DataError, match="task_name -> episodes"):
        MiniWob().load("train", data_dir=tmp_path)


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300) | st.builds(lambda a, b: a + '{"action_type": 4, "click_point": [' + b, st.text(max_size=40), st.text(max_size=40)))
def test_extract_and_normalize_never_raise(task, text):
    example = task.example_from_record(step(), 0)
    answer = task.extract(text, example)
    task.normalize(text, example)
    if answer is not None:
        task.is_correct(task.normalize(answer, example), example)


coords = st.integers(0, 160)


@settings(max_examples=150, deadline=None)
@given(x=st.tuples(coords, coords), y=st.tuples(st.integers(0, 210), st.integers(0, 210)), typed=st.text(max_size=30))
def test_gold_answer_line_is_correct(task, x, y, typed):
    click = task.example_from_record(step(bbox=(min(x), min(y), max(x), max(y))), 0)
    assert task.is_correct(task.extract(task.answer_line(click.answer, click), click), click)
    typing = task.example_from_record(step("type", typed=typed), 0)
    assert task.is_correct(task.extract(task.answer_line(typing.answer, typing), typing), typing)
