"""TabMWP adapter: loading the PromptPG layout, prompts, and PromptPG/R3V answer scoring."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from task_helpers import warmup_turns

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.tabmwp import COT_FREE, COT_MC, QA_FREE, QA_MC, TabMWP, normalize_answer

FIXTURES = Path(__file__).parent / "fixtures" / "tabmwp"


@pytest.fixture(scope="module")
def task() -> TabMWP:
    return TabMWP()


@pytest.fixture(scope="module")
def examples(task) -> dict[str, Example]:
    return {ex.id: ex for ex in task.load("test", FIXTURES)}


@pytest.fixture
def data_copy(tmp_path) -> Path:
    """A writable copy of the fixture folder, to break in one place per test."""
    shutil.copytree(FIXTURES, tmp_path / "tabmwp")
    return tmp_path / "tabmwp"


def rewrite(path: Path, edit) -> None:
    problems = json.loads(path.read_text())
    edit(problems)
    path.write_text(json.dumps(problems))


# ------------------------------------------------------------------------------------------ loading
def test_registered_under_its_name():
    assert tasks.get("tabmwp") is TabMWP
    assert "no official Hugging Face dataset" in TabMWP.sources


def test_load_keeps_file_order_and_schema(task, examples):
    raw = json.loads((FIXTURES / "problems_test.json").read_text())
    assert list(examples) == list(raw)
    for pid, ex in examples.items():
        problem = raw[pid]
        assert ex.task == "tabmwp" and ex.question == problem["question"] and ex.answer == problem["answer"]
        assert ex.choices == problem["choices"]
        assert ex.metadata["unit"] == problem["unit"]
        assert ex.metadata["ques_type"] == problem["ques_type"] and ex.metadata["ans_type"] == problem["ans_type"]
        assert ex.metadata["grade_level"] == problem["grade"]
        assert ex.metadata["grade"] == ("1-6" if problem["grade"] <= 6 else "7-8")
        # images stay lazy paths to tables/<pid>.png
        assert ex.images == [str((FIXTURES / "tables" / f"{pid}.png").resolve())]
    (image,) = examples["106"].load_images()
    assert image.mode == "RGB" and image.size[0] == 120
    assert set(task.breakdown_keys) <= set(examples["101"].metadata)


def test_test1k_split_and_limit(task):
    assert [ex.id for ex in task.load("test1k", FIXTURES)] == ["104", "106"]
    assert [ex.id for ex in task.load("test", FIXTURES, limit=3)] == ["101", "102", "103"]


def test_unknown_split_and_missing_files(task, tmp_path):
    with pytest.raises(ValueError, match="splits"):
        task.load("validation", FIXTURES)
    with pytest.raises(DataError, match="problems_dev.json"):
        task.load("dev", FIXTURES)
    with pytest.raises(DataError, match="--data-dir"):
        task.load("test")


def test_corrupt_json_names_the_file(task, data_copy):
    path = data_copy / "problems_test.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(DataError, match="not valid JSON") as info:
        task.load("test", data_copy)
    assert str(path) in str(info.value)


def test_top_level_must_be_an_object(task, data_copy):
    (data_copy / "problems_test.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="keyed by pid"):
        task.load("test", data_copy)


@pytest.mark.parametrize(
    "pid, edit, problem",
    [
        ("103", lambda p: p.pop("question"), "missing field 'question'"),
        ("102", lambda p: p.update(grade="7"), "field 'grade' should be int, got str"),
        ("101", lambda p: p.update(answer=1250), "field 'answer' should be str, got int"),
        ("105", lambda p: p.update(choices=["yes", 2]), "list of strings"),
        ("106", lambda p: p.update(answer="Friday"), "not one of the choices"),
    ],
)
def test_malformed_record_names_file_pid_and_problem(task, data_copy, pid, edit, problem):
    path = data_copy / "problems_test.json"
    rewrite(path, lambda problems: edit(problems[pid]))
    with pytest.raises(DataError) as info:
        task.load("test", data_copy)
    message = str(info.value)
    assert str(path) in message and f"pid {pid}" in message and problem in message


def test_skip_bad_lists_the_skipped_records(data_copy):
    path = data_copy / "problems_test.json"
    rewrite(path, lambda problems: (problems["102"].pop("answer"), problems["107"].update(grade=None)))
    task = TabMWP(skip_bad=True)
    loaded = task.load("test", data_copy)
    assert [ex.id for ex in loaded] == ["101", "103", "104", "105", "106", "108"]
    assert len(task.bad_records) == 2
    assert "pid 102" in task.bad_records[0] and "'answer'" in task.bad_records[0]
    assert "pid 107" in task.bad_records[1] and "'grade'" in task.bad_records[1]
    # a later load starts a fresh list
    task.load("test1k", data_copy)
    assert task.bad_records == []


def test_missing_image_is_a_bad_record(data_copy):
    (data_copy / "tables" / "104.png").unlink()
    with pytest.raises(DataError, match="pid 104.*image file not found"):
        TabMWP().load("test", data_copy)
    assert len(TabMWP(check_images=False).load("test", data_copy)) == 8


def test_pid_cannot_escape_the_data_root(data_copy):
    rewrite(data_copy / "problems_test.json", lambda problems: problems.update({"../../outside": problems["101"]}))
    with pytest.raises(DataError, match="escapes the data root"):
        TabMWP().load("test", data_copy)
    loaded = TabMWP(allow_outside_paths=True, check_images=False).load("test", data_copy)
    assert loaded[-1].images == [str((data_copy.parent / "outside.png").resolve())]


def test_example_from_record_matches_load(task, examples):
    raw = json.loads((FIXTURES / "problems_test.json").read_text())
    built = task.example_from_record({**raw["106"], "pid": "106"}, 5)
    assert built.id == "106" and built.images == []
    assert (built.question, built.answer, built.choices, built.metadata) == (
        examples["106"].question, examples["106"].answer, examples["106"].choices, examples["106"].metadata)
    assert task.example_from_record(raw["101"], 7).id == "7"  # no pid: the index stands in
    with pytest.raises(DataError, match="pid 3.*'ans_type'"):
        task.example_from_record({**raw["101"], "pid": 3, "ans_type": None}, 0)


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_follow_r3v(task, examples):
    free, mc = examples["101"], examples["106"]
    assert task.cot_prompt(free) == f"How much would it cost to buy 5 bikes? (Unit: $)\n{COT_FREE}"
    assert task.qa_prompt(free) == f"How much would it cost to buy 5 bikes? (Unit: $)\n{QA_FREE}"
    options = "(A) Monday\n(B) Tuesday\n(C) Wednesday\n(D) Thursday"
    assert task.cot_prompt(mc) == f"On which day were the fewest tickets sold?\nOptions:\n{options}\n{COT_MC}"
    assert task.qa_prompt(mc).endswith(f"{options}\n{QA_MC}")
    assert "\u2019" in COT_MC  # R3V writes "option’s" with a typographic apostrophe
    assert task.answer_line("Thursday", mc) == "Answer: D"
    assert task.answer_line("1,250", free) == "Answer: 1,250"
    assert task.select_instruction(mc).startswith("Which prediction")


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize(
    "pid, output, extracted, correct",
    [
        # units, dollar signs, thousands separators, trailing zeros
        ("101", "5 x $250 = $1,250.\nAnswer: $1,250.00", "$1,250.00", True),
        ("101", "Answer: 1250", "1250", True),
        ("101", "Answer: 1250 dollars", "1250 dollars", False),  # only the problem's own unit is removed
        ("104", "Answer: 12 books", "12 books", True),
        ("104", "She read 5 + 7 = 12 books in total.", "12", True),  # the " = " rule
        ("102", "Answer: 3.5", "3.5", True),
        ("102", "Answer: 3.500", "3.500", True),
        ("102", "Answer: 3.51", "3.51", False),
        # fractions, LaTeX, the minus sign
        ("103", "Answer: 0.3", "0.3", True),
        ("103", "The answer is $\\frac{3}{10}$.", "3/10", True),
        ("103", "Answer: 3/11", "3/11", False),
        ("108", "Answer: \u22124", "-4", True),
        # no "Answer:": the last number after " is "
        ("104", "The total is 12.", "12", True),
        # times keep their final period
        ("107", "Answer: 7:25 P.M.", "7:25 P.M.", True),
        # R3V's pattern takes everything after the first "Answer: ", so a trailing remark spoils it
        ("104", "Answer: 12\nShe read twelve books.", "12\nShe read twelve books", False),
        # no digits and no pattern: the whole output is the prediction
        ("101", "I cannot tell.", "I cannot tell", False),
        # multiple choice: letters in their official forms
        ("106", "Answer: D", "Thursday", True),
        ("106", "answer is hidden. Answer: d", "Thursday", True),
        ("106", "(D)", "Thursday", True),
        ("106", "D", "Thursday", True),
        ("106", "D. Thursday", "Thursday", True),
        ("106", "The answer is D.", "Thursday", True),
        ("106", "Answer: B", "Tuesday", False),
        # no letter: the option sharing most words with the output
        ("105", "Answer: yes", "yes", True),
        ("106", "It is Thursday", "Thursday", True),
        # letter outside the options: skipped, then the word-overlap rule (not a random option)
        ("106", "Thursday has the fewest tickets. Answer: F", "Thursday", True),
    ],
)
def test_extraction_and_scoring_edge_cases(task, examples, pid, output, extracted, correct):
    example = examples[pid]
    assert task.extract(output, example) == extracted
    assert task.is_correct(task.extract(output, example), example) is correct


def test_out_of_range_letter_without_overlap_is_deterministic(task, examples):
    example = examples["106"]
    picks = {task.extract("The answer is Friday.", example) for _ in range(20)}
    # "F" names no option; no option word appears, so the tie goes to the first option
    assert picks == {example.choices[0]}


def test_empty_and_blank_outputs_are_unparseable(task, examples):
    for example in examples.values():
        assert task.extract("", example) is None
        assert task.extract("  \n\t", example) is None
        assert task.is_correct(None, example) is False


def test_unevaluable_numbers(task, examples):
    zero = task.example_from_record({**json.loads((FIXTURES / "problems_test.json").read_text())["104"],
                                     "answer": "0"}, 0)
    for output in ("Answer: 1/0", "Answer: 1.2.3"):
        assert task.is_correct(task.extract(output, zero), zero) is False
        assert TabMWP(unparseable_as_zero=True).is_correct(task.extract(output, zero), zero) is True
    assert normalize_answer("1.2.3", None) == "1.2.3"
    assert normalize_answer("1/0", None, unparseable_as_zero=True) == "0"


@pytest.mark.parametrize(
    "text, unit, expected",
    [("$1,000", None, "1000"), ("3.50", "$", "3.5"), ("3/10", None, "0.3"), ("5 books", "books", "5"),
     ("-3/2", None, "-1.5"), ("5.", None, "5"), ("45%", None, "45%"), ("2/3", None, "0.667"), ("+7", None, "7")],
)
def test_normalize_answer_rule(text, unit, expected):
    assert normalize_answer(text, unit) == expected


def test_normalize_makes_equal_answers_vote_together(task, examples):
    assert task.normalize("$1,250.00", examples["101"]) == task.normalize("1250", examples["101"])
    assert task.normalize("THURSDAY", examples["106"]) == task.normalize("Thursday", examples["106"])
    assert task.normalize("3/10", examples["103"]) == task.normalize("0.30", examples["103"])


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), pid=st.sampled_from(["101", "103", "105", "106", "107"]))
def test_extract_and_normalize_never_raise(task, examples, text, pid):
    example = examples[pid]
    answer = task.extract(text, example)
    assert answer is None or isinstance(answer, str)
    if answer is not None:
        assert isinstance(task.normalize(answer, example), str)
        assert isinstance(task.is_correct(answer, example), bool)
    assert isinstance(task.normalize(text, example), str)


numbers = st.one_of(
    st.integers(-10**6, 10**7).map(lambda n: f"{n:,}"),
    st.integers(0, 10**5).map(str),
    st.decimals(min_value=0, max_value=10**4, places=2, allow_nan=False, allow_infinity=False).map(str),
    st.tuples(st.integers(1, 99), st.integers(1, 99)).map(lambda t: f"{t[0]}/{t[1]}"),
)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=15).map(str.strip).filter(bool)


@settings(max_examples=200, deadline=None)
@given(gold=st.one_of(numbers, words), unit=st.sampled_from([None, "$", "books"]))
def test_answer_line_round_trips_free_text(task, gold, unit):
    example = Example("x", "tabmwp", "q", gold, metadata={"unit": unit})
    assert task.is_correct(task.extract(task.answer_line(gold, example), example), example)


@settings(max_examples=200, deadline=None)
@given(choices=st.lists(words, min_size=2, max_size=6, unique=True), data=st.data())
def test_answer_line_round_trips_choices(task, choices, data):
    gold = data.draw(st.sampled_from(choices))
    example = Example("x", "tabmwp", "q", gold, choices=choices, metadata={"unit": None})
    line = task.answer_line(gold, example)
    assert re.fullmatch(r"Answer: [A-F]", line)
    assert task.extract(line, example) == gold and task.is_correct(gold, example)


# ------------------------------------------------------------------------------------------ real files
def test_real_problems_load_and_score_their_own_gold(shared_fixtures, tmp_path):
    """PromptPG's first 40 test1k problems; only 8 of their table images are in the sample."""
    source = shared_fixtures / "tabmwp"
    # copies, not symlinks: safe_path resolves links, and these would point outside the data root
    shutil.copy(source / "problems_sample.json", tmp_path / "problems_test1k.json")
    shutil.copytree(source / "tables", tmp_path / "tables")
    raw = json.loads((source / "problems_sample.json").read_text())
    task = TabMWP(skip_bad=True)
    loaded = task.load("test1k", tmp_path)
    with_images = {p.stem for p in (source / "tables").glob("*.png")}
    assert {ex.id for ex in loaded} == with_images
    assert len(task.bad_records) == len(raw) - len(with_images)
    assert all("image file not found" in message for message in task.bad_records)

    everything = TabMWP(check_images=False).load("test1k", tmp_path)
    assert [ex.id for ex in everything] == list(raw)
    for ex in everything:
        assert task.is_correct(task.extract(task.answer_line(ex.answer, ex), ex), ex), ex.id
        if ex.choices:
            wrong = next(c for c in ex.choices if c != ex.answer)
            assert not task.is_correct(task.extract(task.answer_line(wrong, ex), ex), ex), ex.id
        else:
            assert task.is_correct(task.extract(f"Answer: {ex.answer}", ex), ex), ex.id


_UNIT = re.compile(r" \(Unit: (.+)\)$")


def test_real_warmup_prompts_and_rationales(shared_fixtures):
    """R3V's GPT-distilled TabMWP warm-up: our CoT prompt is theirs, and their answers extract."""
    task = TabMWP()
    for index, (record, prompt, rationale) in enumerate(warmup_turns(shared_fixtures, "tabmwp_qwenvl_sft_gpt_sample.json")):
        head = prompt.rsplit("\nFirst generate", 1)[0]
        question, _, options = head.partition("\nOptions:\n")
        choices = [line[4:] for line in options.split("\n")] if options else None
        unit = _UNIT.search(question)
        final = rationale.rsplit("Answer:", 1)[1].strip()
        gold = choices["ABCDEF".index(final)] if choices else final
        example = task.example_from_record(
            {"pid": record["image"][:-4], "question": _UNIT.sub("", question), "answer": gold,
             "unit": unit.group(1) if unit else None, "choices": choices, "ques_type": "x", "ans_type": "x",
             "grade": 1},
            index,
        )
        assert task.cot_prompt(example) == prompt
        assert task.is_correct(task.extract(rationale, example), example), record["image"]


# ------------------------------------------------------------------------------------------ r3v score
def test_flags_accept_text_from_the_command_line():
    assert TabMWP(unparseable_as_zero="true").options.unparseable_as_zero is True
    assert TabMWP(skip_bad="false").options.skip_bad is False
    with pytest.raises(ValueError, match="unparseable_as_zero must be true or false"):
        TabMWP(unparseable_as_zero="sometimes")


def test_score_file_reports_official_breakdown(task, tmp_path):
    """Records in the official schema plus a prediction, scored by ``r3v score``'s library path."""
    from r3v.scoring import score_file

    raw = json.loads((FIXTURES / "problems_test.json").read_text())
    lines, expected = [], []
    for number, (pid, problem) in enumerate(raw.items()):
        ex = task.example_from_record({**problem, "pid": pid}, number)
        right = number % 2 == 0
        prediction = task.answer_line(ex.answer, ex) if right else "Answer: 999999"
        lines.append(json.dumps({**problem, "pid": pid, "prediction": f"Solution: ...\n{prediction}"}))
        expected.append((problem, right))
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = score_file(task, path)
    assert report.n == len(raw) and report.correct == sum(right for _, right in expected)
    for band, grades in (("1-6", range(1, 7)), ("7-8", (7, 8))):
        group = [right for problem, right in expected if problem["grade"] in grades]
        assert report.breakdown["grade"][band] == {"n": len(group), "accuracy": sum(group) / len(group)}
    for key in ("ques_type", "ans_type"):
        assert set(report.breakdown[key]) == {problem[key] for problem in raw.values()}
