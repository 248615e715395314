"""Every registered task keeps the ``Task`` contract: one test module, no list of tasks.

The tasks come from ``r3v.registry.tasks.names()`` and their data from ``tests/fixtures/<module>``
(see ``task_examples``), so a benchmark added as one module is checked here without editing this
file. Each check runs the task's real code on its real fixture files.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from task_examples import FIXTURES, fixture_sets, reads_files

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import OptionError, Task, build_task, read_json, read_records

NAMES = tasks.names()
OPTIONAL_HOOKS = ("example_from_record", "prediction_from_record", "qa_target", "teacher_rationale", "body",
                  "check_steps", "counterfactual", "gold_for_image")

#: Outputs a model may well produce: empty, cut off, in other formats, or hostile to parsers.
JUNK = [
    "", " ", "\n\n", "Answer:", "Answer: ", "Answer: (", "Answer: (Z)", "Answer: -0", "Answer: 1e309",
    "answer answer answer", "(A)(B)(C)", "{", '{"action_type": 4, "click_point": [0.5', '{"action_type": 3}',
    "nan", "inf", "-", "\x00\x01", "ünïcödé ✓", "9" * 500, "Answer: " + "(" * 200, "The answer is $1,000.00.",
]


def _examples(name: str) -> tuple[Task, tuple[Example, ...]]:
    """The task and every example of every fixture set it loads (see ``task_examples.fixture_sets``)."""
    sets = fixture_sets(name)
    if not sets:
        pytest.skip(f"no fixture data for {name} under {FIXTURES}")
    task = tasks.get(name)()
    return task, tuple(example for data in sets for example in data.load()[1])


def test_every_registered_task_is_checked_here():
    # a task module that does not import or register would drop out of tasks.names() silently
    assert NAMES and all(name in tasks for name in NAMES)
    for name in NAMES:
        assert tasks.get(name).name == name


@pytest.mark.parametrize("name", NAMES)
def test_the_protocol_holds(name):
    task = tasks.get(name)()
    assert isinstance(task, Task)
    assert task.name == name
    assert task.splits and all(isinstance(split, str) for split in task.splits)
    assert isinstance(task.sources, str) and task.sources.strip()
    assert set(task.breakdown_keys) <= set(task.metadata_keys), "a breakdown key no example carries"
    assert dataclasses.is_dataclass(task.Options) and isinstance(task.options, task.Options)
    assert task.bad_records == []
    for hook in OPTIONAL_HOOKS:
        value = getattr(task, hook)  # declared on every task: None, or the hook
        assert value is None or callable(value), (name, hook)
    assert isinstance(task.prompt_style, str)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_data_loads(name):
    task = tasks.get(name)()
    folder = FIXTURES / name.replace("-", "_")
    if reads_files(task) and not folder.is_dir():
        pytest.skip(f"{name} has no fixture folder {folder}")
    assert fixture_sets(name), f"nothing under {folder} loads with any split of {name}"
    for data in fixture_sets(name):
        task, examples = data.load()
        assert examples and task.bad_records == [], (data, task.bad_records)
        assert len({ex.id for ex in examples}) == len(examples), f"example ids must be unique in {data}"
        for example in examples:
            assert example.task == name
            assert set(example.metadata) <= set(task.metadata_keys), (example.id, set(example.metadata))
            assert all(not isinstance(image, str) or Path(image).is_file() for image in example.images)
        assert len(task.load(data.split, data.folder, limit=1)) == 1


@pytest.mark.parametrize("name", NAMES)
def test_prompts_are_non_empty_text(name):
    task, examples = _examples(name)
    for example in examples:
        for prompt in (task.cot_prompt(example), task.qa_prompt(example), task.select_instruction(example),
                       task.answer_line(example.answer, example)):
            assert isinstance(prompt, str) and prompt.strip(), (name, example.id)
        assert example.question in task.cot_prompt(example) and example.question in task.qa_prompt(example)


@pytest.mark.parametrize("name", NAMES)
def test_gold_answer_line_round_trips(name):
    """A rationale ending in the gold's answer line is extracted and scored right; no answer never is."""
    task, examples = _examples(name)
    for example in examples:
        line = task.answer_line(example.answer, example)
        for output in (line, f"Let me work it out step by step.\n{line}"):
            answer = task.extract(output, example)
            assert isinstance(answer, str), (name, example.id, output)
            assert task.is_correct(answer, example) is True, (name, example.id, output)
        assert task.is_correct(None, example) is False


@pytest.mark.parametrize("name", NAMES)
def test_extract_never_raises_and_normalize_is_idempotent(name):
    task, examples = _examples(name)
    for example in examples:
        outputs = JUNK + [task.answer_line(example.answer, example), str(example.answer)]
        for text in outputs:
            answer = task.extract(text, example)
            assert answer is None or isinstance(answer, str), (name, text)
            assert isinstance(task.is_correct(answer, example), bool)
            if answer is not None:
                once = task.normalize(answer, example)
                assert task.normalize(once, example) == once, (name, example.id, text)


# --- options -----------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    """An option value written the way a user types it after ``--task-arg KEY=``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _junk_for(hint: Any) -> str | None:
    """A text value the field's type cannot take; None where every text is valid (a plain str)."""
    if type(None) in typing.get_args(hint):  # X | None: X decides
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "no-such-choice"
    if hint is bool:
        return "maybe"
    if hint in (int, float):
        return "many"
    if origin is tuple:
        return "x"  # not a number, and one value where tuple[int, int] needs two
    if origin is dict:
        return "{not json"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_options_parse_from_text(name):
    options_type = tasks.get(name).Options
    defaults = options_type()
    as_text = {f.name: _as_text(getattr(defaults, f.name)) for f in dataclasses.fields(options_type)}
    assert build_task(name, as_text).options == defaults  # --task-arg KEY=VALUE for every option
    typed = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(options_type)}
    assert build_task(name, typed).options == defaults  # a YAML config's typed values


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_are_named(name):
    options_type = tasks.get(name).Options
    known = [f.name for f in dataclasses.fields(options_type)]
    with pytest.raises(OptionError) as info:
        build_task(name, {"no_such_option": "1"})
    message = str(info.value)
    assert repr(name) in message and "no_such_option" in message and all(key in message for key in known)
    hints = typing.get_type_hints(options_type)
    for key in known:
        junk = _junk_for(hints[key])
        if junk is None:
            continue
        with pytest.raises(OptionError) as info:
            build_task(name, {key: junk})
        assert repr(name) in str(info.value) and key in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_common_flags_reach_the_tasks_that_take_them(name):
    """The CLI's --skip-bad / --allow-outside-paths go to every task whose options have them (and
    are left out for the others); a --task-arg of the same name overrides the flag."""
    fields = {f.name for f in dataclasses.fields(tasks.get(name).Options)}
    task = build_task(name, {}, skip_bad=True, allow_outside_paths=True)
    for flag in ("skip_bad", "allow_outside_paths"):
        assert getattr(task.options, flag, None) is (True if flag in fields else None)
    if "skip_bad" in fields:
        assert build_task(name, {"skip_bad": "false"}, skip_bad=True).options.skip_bad is False
    else:
        with pytest.raises(OptionError, match="skip_bad"):
            build_task(name, {"skip_bad": "true"})


# --- example_from_record ---------------------------------------------------------------------------


def _records(folder: Path) -> list[tuple[Path, int, dict]]:
    """(file, index, record) for the records of every JSON / JSON-lines file under ``folder``, however
    the file holds them: a list, a CLEVR ``questions`` list, or an object of records keyed by id."""
    out = []
    for path in sorted([*folder.rglob("*.json"), *folder.rglob("*.jsonl")]):
        try:
            data = read_json(path) if path.suffix == ".json" else read_records(path)
        except DataError:
            data = read_records(path)
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            data = data["questions"]
        elif isinstance(data, dict):
            data = list(data.values())
        out += [(path, index, record) for index, record in enumerate(data) if isinstance(record, dict)]
    return out


def _gist(example: Example) -> tuple:
    return example.question, str(example.answer), tuple(example.choices or ())


@pytest.mark.parametrize("name", NAMES)
def test_example_from_record_reads_fixture_records(name):
    """Every record of the fixture files becomes an Example or a DataError (never another error),
    and records of the data files give the examples the loader gives."""
    task, examples = _examples(name)
    if task.example_from_record is None:
        pytest.skip(f"{name} has no example_from_record (r3v score uses the generic reader)")
    records = _records(FIXTURES / name.replace("-", "_"))
    loaded = {_gist(ex) for ex in examples}
    matched = 0
    for path, index, record in records:
        try:
            built = task.example_from_record(record, index)
        except DataError:
            continue
        assert isinstance(built, Example) and built.task == name, (path, index)
        matched += _gist(built) in loaded
    assert matched, f"no record under {FIXTURES / name} reads as an example the loader gives"
    for junk in ({}, {"id": ["x"]}, {"answer": None}, {"question": 7, "choices": "AB"}):
        try:
            task.example_from_record(junk, 0)
        except DataError:
            pass


@pytest.mark.parametrize("name", NAMES)
def test_example_from_record_on_shared_samples(name, shared_fixtures):
    """The real sample files in ../shared/fixtures: each record an Example or a DataError."""
    task = tasks.get(name)()
    folder = shared_fixtures / name.replace("-", "_")
    if task.example_from_record is None or not folder.is_dir():
        pytest.skip(f"no shared sample for {name}, or no example_from_record")
    records = _records(folder)
    assert records, f"no records under {folder}"
    for path, index, record in records:
        try:
            example = task.example_from_record(record, index)
        except DataError as exc:
            assert str(exc), (path, index)
            continue
        assert example.task == name and example.answer is not None, (path, index)


# --- a new benchmark ---------------------------------------------------------------------------------

TOY_TASK = '''
"""toy-count: how many dots, as a new benchmark module would be written."""
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.base import InstructionPrompts, TaskBase


@tasks.register("toy-count")
class ToyCount(InstructionPrompts, TaskBase):
    name = "toy-count"
    splits = ("test",)
    sources = "built in"
    metadata_keys = breakdown_keys = ("size",)
    cot_instruction, qa_instruction, select_text = "Think, then answer.", "Answer.", "Which is right?"

    def load(self, split, data_dir=None, limit=None):
        self.start_load(split)
        count = 4 if limit is None else min(limit, 4)
        return [Example(f"t-{i}", self.name, f"How many dots in {'.' * i}?", str(i), metadata={"size": "small"})
                for i in range(count)]

    def extract(self, text, example):
        tail = text.rpartition("Answer:")[2].strip()
        return tail if tail.isdigit() else None

    def normalize(self, answer, example):
        return answer.strip()

    def is_correct(self, answer, example):
        return answer is not None and answer == example.answer
'''


def test_a_new_task_module_passes_every_check_by_name(tmp_path, monkeypatch):
    """A benchmark is one module: registered, it meets every check above with no list edited."""
    from r3v import registry

    (tmp_path / "r3v_toy_task.py").write_text(TOY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    import r3v_toy_task  # noqa: F401 - registers toy-count, as a plugin entry point or r3v/tasks/ would

    try:
        assert "toy-count" in tasks.names()
        for check in (test_the_protocol_holds, test_fixture_data_loads, test_prompts_are_non_empty_text,
                      test_gold_answer_line_round_trips, test_extract_never_raises_and_normalize_is_idempotent,
                      test_options_parse_from_text, test_bad_options_are_named,
                      test_common_flags_reach_the_tasks_that_take_them):
            check("toy-count")
    finally:
        registry.tasks._entries.pop("toy-count", None)
        monkeypatch.delitem(sys.modules, "r3v_toy_task", raising=False)
