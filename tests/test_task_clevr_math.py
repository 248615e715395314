"""CLEVR-Math adapter: R3V and CLEVR-Math layouts, the parquet hub mirror, R3V's integer scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from task_helpers import load_error

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.clevr_math import QA, ClevrMath, extract_number

FIXTURES = Path(__file__).parent / "fixtures" / "clevr_math"
R3V_DIR, OFFICIAL_DIR = FIXTURES / "r3v", FIXTURES / "official"
R3V_RECORDS = json.loads((R3V_DIR / "clevr_test.json").read_text())
OFFICIAL_RECORDS = json.loads((OFFICIAL_DIR / "clevr-math-test.json").read_text())["questions"]


@pytest.fixture(scope="module")
def task() -> ClevrMath:
    return ClevrMath()


@pytest.fixture
def r3v_copy(tmp_path) -> Path:
    shutil.copytree(R3V_DIR, tmp_path / "clevr")
    return tmp_path / "clevr"


def example(answer: str) -> Example:
    return Example("0", "clevr-math", "Subtract all red spheres. How many objects are left?", answer)


# ------------------------------------------------------------------------------------------ loading
def test_registered_under_its_name():
    assert tasks.get("clevr-math") is ClevrMath


def test_load_r3v_layout(task):
    loaded = task.load("test", R3V_DIR)
    assert [ex.id for ex in loaded] == ["0", "1", "2"]
    assert [ex.answer for ex in loaded] == ["2", "10", "0"]  # int and str answers both become strings
    assert [ex.question for ex in loaded] == [r["question"] for r in R3V_RECORDS]
    images = [Path(ex.images[0]) for ex in loaded]
    assert [p.name for p in images] == ["CLEVR_test_000001.png", "CLEVR_test_000002.png", "CLEVR_test_000001.png"]
    assert all(p.parent == (R3V_DIR / "clevr_math_imgs").resolve() for p in images)
    assert loaded[0].load_images()[0].size == (40, 30)
    assert all(ex.metadata == {"template": None} for ex in loaded)
    assert len(task.load("test", R3V_DIR, limit=2)) == 2


def test_load_official_question_file(task):
    loaded = task.load("test", OFFICIAL_DIR)
    assert [ex.answer for ex in loaded] == [str(q["answer"]) for q in OFFICIAL_RECORDS]
    assert [ex.metadata["template"] for ex in loaded] == ["subtraction", "addition", "subtraction-multihop"]
    # images live under the CLEVR split the record names, as the official loader joins them
    assert loaded[1].images == [str((OFFICIAL_DIR / "CLEVR_v1.0/images/val/CLEVR_val_000009.png").resolve())]


def test_question_file_format_under_the_r3v_name(task, r3v_copy):
    (r3v_copy / "clevr_test.json").write_text(json.dumps({"questions": [
        {"image_filename": "CLEVR_test_000002.png", "question": "q?", "answer": 7,
         "template_filename": "addition.json"}]}))
    (loaded,) = task.load("test", r3v_copy)
    assert loaded.answer == "7" and loaded.metadata["template"] == "addition"
    assert Path(loaded.images[0]).parent.name == "clevr_math_imgs"


def test_missing_and_broken_files(task, r3v_copy):
    with pytest.raises(DataError, match="clevr_train.json nor clevr-math-train.json"):
        task.load("train", r3v_copy)
    with pytest.raises(ValueError, match="splits"):
        task.load("dev", r3v_copy)
    path = r3v_copy / "clevr_test.json"
    path.write_bytes(b"\xff\xfe[")
    assert str(path) in str(load_error(task, "test", r3v_copy, "not valid JSON"))
    path.write_text('{"info": {}}')
    load_error(task, "test", r3v_copy, '"questions" list')


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"filename": "CLEVR_test_000001.png", "answer": 1}, "missing field 'question'"),
        ({"filename": "CLEVR_test_000001.png", "question": "q", "answer": 2.5}, "should be an integer, got 2.5"),
        ({"filename": "CLEVR_test_000001.png", "question": "q", "answer": "three"}, "got 'three'"),
        ({"filename": "CLEVR_test_000001.png", "question": "q", "answer": True}, "got True"),
        ({"question": "q", "answer": 1}, "missing field 'filename' or 'image' or 'image_filename'"),
        ({"filename": "CLEVR_test_000404.png", "question": "q", "answer": 1}, "image file not found"),
        ({"filename": "../../../x.png", "question": "q", "answer": 1}, "escapes the data root"),
        ("not a record", "expected a JSON object"),
    ],
)
def test_malformed_records_name_file_and_index(task, r3v_copy, record, problem):
    path = r3v_copy / "clevr_test.json"
    path.write_text(json.dumps([R3V_RECORDS[0], record]))
    with pytest.raises(DataError) as info:
        task.load("test", r3v_copy)
    assert "index 1" in str(info.value) and problem in str(info.value)
    if "image" not in problem and "escapes" not in problem:
        assert str(path) in str(info.value)
    lenient = ClevrMath(skip_bad=True)
    assert [ex.id for ex in lenient.load("test", r3v_copy)] == ["0"]
    assert len(lenient.bad_records) == 1 and problem in lenient.bad_records[0]


def test_example_from_record(task):
    built = task.example_from_record({"question": "Add 1 cubes. How many cubes exist?", "answer": 3}, 9)
    assert (built.id, built.answer, built.images) == ("9", "3", [])
    with_image = task.example_from_record(R3V_RECORDS[1], 1, data_dir=R3V_DIR)
    assert Path(with_image.images[0]).name == "CLEVR_test_000002.png"
    with pytest.raises(DataError, match="index 4.*'answer'"):
        task.example_from_record({"question": "q"}, 4)


# ------------------------------------------------------------------------------------------ hub
@pytest.fixture(scope="module")
def hub_file(tmp_path_factory) -> Path:
    """A parquet file in the ohjoonhee/CLEVR-Math-Test schema, written by ``datasets``."""
    import datasets

    folder = tmp_path_factory.mktemp("clevr-hub")
    rows = [
        {"template": q["template_filename"][:-5], "id": q["image_filename"], "question": q["question"],
         "image": {"bytes": (OFFICIAL_DIR / "CLEVR_v1.0/images/val" / q["image_filename"]).read_bytes(),
                   "path": q["image_filename"]},
         "label": q["answer"]}
        for q in OFFICIAL_RECORDS
    ]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(folder / "test.parquet")
    return folder / "test.parquet"


def test_hub_mirror_loads_like_the_question_file(hub_file, tmp_path):
    task = ClevrMath(hf_dataset=str(hub_file), cache_dir=str(tmp_path / "cache"))
    from_hub, from_dir = task.load("test"), ClevrMath().load("test", OFFICIAL_DIR)
    assert [(e.id, e.question, e.answer, e.metadata) for e in from_hub] == [
        (e.id, e.question, e.answer, e.metadata) for e in from_dir]
    for hub_ex, dir_ex in zip(from_hub, from_dir, strict=True):
        assert isinstance(hub_ex.images[0], Image.Image)
        assert hub_ex.load_images()[0].tobytes() == dir_ex.load_images()[0].tobytes()
    assert len(task.load("test", limit=1)) == 1


def test_hub_errors(tmp_path):
    with pytest.raises(DataError, match="only a test split"):
        ClevrMath().load("train")
    with pytest.raises(DataError, match="cannot load"):
        ClevrMath(hf_dataset=str(tmp_path / "none.parquet"), cache_dir=str(tmp_path)).load("test")
    with pytest.raises(DataError, match="--data-dir"):
        ClevrMath(hf_dataset=None).load("test")


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_follow_r3v(task):
    ex = example("2")
    assert task.cot_prompt(ex).endswith(
        "\nFirst generate a step-by-step solution, then answer the question using a single numerical value (0-10).")
    assert task.qa_prompt(ex) == f"{ex.question}\n{QA}"
    assert task.answer_line(2, ex) == "Answer: 2"
    assert task.select_instruction(ex) == "Which prediction is correct? Give the final answer with a single " \
        "numerical value (0-10)."


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize(
    "output, extracted",
    [
        ("3", "3"),
        ("  10\n", "10"),
        ("11", None),  # a bare number counts only in 0-10
        ("Answer: 11", "11"),
        ("Solution:\n1. There are 5 objects.\n\nAnswer:\n4", "4"),
        ("Answer: 3.0", "3"),
        ("Answer: -2", "-2"),
        ("Answer: 2\nAnswer: 5", "2"),  # the first "Answer:" wins
        ("The answer is 4", None),
        ("Answer: four", None),
        ("", None),
    ],
)
def test_extraction_edge_cases(task, output, extracted):
    assert task.extract(output, example("4")) == extracted


def test_scoring_is_exact_string_match(task):
    assert task.is_correct("3", example("3"))
    assert not task.is_correct("03", example("3"))  # R3V compares strings
    assert not task.is_correct("4", example("3"))
    assert not task.is_correct(None, example("3"))
    assert task.is_correct(task.extract("Answer: 3.0", example("3")), example("3"))
    assert task.normalize(" 3 ", example("3")) == task.normalize("3", example("3"))


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_extract_never_raises(task, text):
    answer = extract_number(text)
    assert answer is None or isinstance(answer, str)
    assert isinstance(task.is_correct(answer, example("3")), bool)
    assert isinstance(task.normalize(text, example("3")), str)


@settings(max_examples=100, deadline=None)
@given(gold=st.integers(-20, 1000))
def test_answer_line_round_trips(task, gold):
    ex = example(str(gold))
    assert task.is_correct(task.extract(task.answer_line(gold, ex), ex), ex)


# ------------------------------------------------------------------------------------------ real files
def _split_turns(record: dict) -> tuple[str, str]:
    prompt, reply = (turn["value"] for turn in record["conversations"])
    return prompt, reply


def test_real_direct_answer_records(shared_fixtures, task):
    """R3V's CLEVR QA seed data: our QA prompt is theirs, and every bare gold answer scores."""
    records = json.loads((shared_fixtures / "clevr_math" / "sft_qa_sample.json").read_text())
    for index, record in enumerate(records):
        prompt, reply = _split_turns(record)
        question = prompt.removesuffix(f"\n{QA}")
        ex = task.example_from_record({"image": record["image"], "question": question, "answer": reply}, index)
        assert task.qa_prompt(ex) == prompt
        assert task.extract(reply, ex) == reply and task.is_correct(task.extract(reply, ex), ex)


def test_real_warmup_rationales(shared_fixtures, task):
    """R3V's GPT-distilled CLEVR warm-up: our CoT prompt is theirs, and the final answer extracts."""
    records = json.loads((shared_fixtures / "clevr_math" / "gpt_cot_sample.json").read_text())
    for index, record in enumerate(records):
        prompt, rationale = _split_turns(record)
        final = rationale.rsplit("Answer:", 1)[1].strip()
        question = prompt.rsplit("\nFirst generate", 1)[0]
        ex = task.example_from_record({"question": question, "answer": int(final)}, index)
        assert task.cot_prompt(ex) == prompt
        assert task.is_correct(task.extract(rationale, ex), ex)
        assert not task.is_correct(task.extract(rationale, ex), example(str(int(final) + 1)))


# ------------------------------------------------------------------------------------------ r3v score
def test_score_file_on_question_records(tmp_path):
    """CLEVR-Math question records plus predictions through ``r3v score``'s library path."""
    from r3v.scoring import score_file

    predictions = ["Answer: 4", "3", "Answer: 6"]  # the last is wrong (gold 5)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({**q, "prediction": p}) + "\n" for q, p in zip(OFFICIAL_RECORDS, predictions,
                                                                                      strict=True)))
    report = score_file(ClevrMath(), path)
    assert (report.n, report.correct) == (3, 2)
    assert report.breakdown["template"] == {
        "addition": {"n": 1, "accuracy": 1.0},
        "subtraction": {"n": 1, "accuracy": 1.0},
        "subtraction-multihop": {"n": 1, "accuracy": 0.0},
    }
    assert ClevrMath().example_from_record({"question": "q", "label": 4}, 0).answer == "4"
    assert ClevrMath(skip_bad="yes").options.skip_bad is True
