"""GeoQA: the deterministic letter judge, the R3V-parity judge, the three data layouts, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from task_helpers import copy_with_edit

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.geoqa import GeoQA

FIXTURES = Path(__file__).parent / "fixtures" / "geoqa"
ANGLES = ["30.0", "40.0", "45.0", "60.0"]


def mc(choices: list[str] = ANGLES, answer: str = "B") -> Example:
    return Example(id="q", task="geoqa", question="?", answer=answer, choices=choices)


@pytest.fixture(scope="module")
def letter() -> GeoQA:
    return GeoQA()


@pytest.fixture(scope="module")
def r3v() -> GeoQA:
    return GeoQA(judge="r3v")


def test_registered_and_judges():
    assert tasks.get("geoqa") is GeoQA
    with pytest.raises(ValueError, match="letter, r3v"):
        GeoQA(judge="random")


# --- the default judge -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: B", "B"),
        ("Answer: \nB", "B"),  # R3V's training targets
        ("**Answer:** (C)", "C"),
        ("The answer is option D.", "D"),
        ("the answer is (b)", "B"),
        ("Answer: 40.0", "B"),  # option text
        ("Answer: 45 degrees", "C"),  # a number equal to an option
        ("So the answer: 40.0, not 30.0", "B"),  # after a marker the first candidate counts
        ("Answer: 140.0", None),  # "40.0" inside "140.0" is not the option
        ("[Answer]\n(D)\n[Rationale]\n(A) is wrong", "D"),
        ("angle C = 180 - 60.0 - 80.0 = 40.0\nSo angle C is 40.0 degrees.", "B"),  # no marker: last line
        ("Angles 30.0 and 60.0 are given.\nHence it is 45.0, not 60.0", "D"),  # last line, latest candidate
        ("angle C is opposite side A B", None),  # never the last letter anywhere
        ("B", "B"),
        ("(C)</s>", "C"),
        ("Answer: E", None),  # outside the four options
        ("B is the answer", "B"),  # nothing after the marker: the last line
        ("", None),
        ("   \n  ", None),
    ],
)
def test_letter_judge(letter, text, expected):
    assert letter.extract(text, mc()) == expected


def test_letter_judge_is_deterministic(letter):
    # the R3V judge credits such outputs at random; the default judge never does
    assert {letter.extract("I cannot solve this.", mc()) for _ in range(20)} == {None}


# --- the R3V-parity judge --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: B", "B"),
        ("Answer: \nB", "B"),
        ("Answer: 40.0", None),  # no lower-case "answer": the last letter anywhere is "r" -> R, not an option
        ("the answer is 45 degrees", None),  # text after "answer" ends in "s" -> S
        ("the answer: 40.0", "B"),  # no letter after "answer": option text
        ("so the answer is (C) because (A) fails", "A"),  # last "(X)" after "answer"
        ("In triangle A B C", "C"),  # the last letter anywhere
        ("12 %% 7", None),  # R3V gives random credit here (p=0.75); r3v scores it wrong
    ],
)
def test_r3v_judge(r3v, text, expected):
    assert r3v.extract(text, mc()) == expected


# --- loading ---------------------------------------------------------------------------------------


def test_load_r3v_json_array(letter):
    examples = letter.load("test", data_dir=FIXTURES)  # the parent of geoQA-data works
    rows = json.loads((FIXTURES / "geoQA-data" / "test.jsonl").read_text())
    assert [e.id for e in examples] == [r["id"] for r in rows]
    assert [e.answer for e in examples] == ["B", "B", "B"]  # "B", the index 1, "B"
    assert examples[0].metadata == {"domain": "geometry", "topic": "angle"}
    # a "\\" separated image name resolves under images/
    assert Path(examples[2].images[0]) == (FIXTURES / "geoQA-data" / "images" / "sub" / "test-2.png").resolve()
    assert all(Path(e.images[0]).is_file() for e in examples)
    assert letter.body(examples[0]) == rows[0]["question"] + "\nChoices:\n(A) 40.0\n(B) 50.0\n(C) 130.0\n(D) 140.0"
    assert letter.cot_prompt(examples[0]).endswith('Finally answer with option from choices with prefix "Answer: ".')


def test_load_real_jsonl(letter):
    examples = letter.load("train", data_dir=FIXTURES / "geoQA-data", limit=5)
    assert [(e.id, e.answer) for e in examples] == [("train-0", "A"), ("train-1", "B")]


def test_load_sharegpt(letter):
    examples = letter.load("train", data_dir=FIXTURES / "sharegpt")
    first = examples[0]
    assert first.id == "train-0"
    assert first.question.startswith("Calculation: As shown in the figure")
    assert first.choices == ["70.0", "60.0", "50.0", "40.0"]
    assert first.answer == "A"
    assert Path(first.images[0]) == (FIXTURES / "sharegpt" / "images" / "train-0.png").resolve()


def test_conformance_r3v_train_sample(shared_fixtures, tmp_path):
    """R3V's own geoqa_train_base.json records load, and both judges read their targets as correct."""
    source = json.loads((shared_fixtures / "geoqa" / "train_base_sample.json").read_text())
    shutil.copy(shared_fixtures / "geoqa" / "train_base_sample.json", tmp_path / "geoqa_train_base.json")
    (tmp_path / "images").mkdir()
    for record in source:  # the real images are not public: stand-ins with the same names
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / Path(record["images"][0]).name)
    examples = GeoQA().load("train", data_dir=tmp_path)
    assert len(examples) == len(source) == 40
    assert examples[0].choices == ["30.0", "40.0", "45.0", "60.0"] and examples[0].answer == "B"
    for example, record in zip(examples, source, strict=True):
        target = record["messages"][1]["content"]  # "Answer: \nB"
        assert example.answer == target.split()[-1]
        for judge in ("letter", "r3v"):
            task = GeoQA(judge=judge)
            assert task.is_correct(task.extract(target, example), example)


def _hub_copy(tmp_path: Path) -> Path:
    """A local parquet folder in the layout and schema of hz2475/geoQA."""
    import datasets

    png = (FIXTURES / "geoQA-data" / "images" / "test-0.png").read_bytes()
    rows = [
        {"id": i, "subject": f"Calculation: question {i}", "choices": ANGLES, "label": i % 4, "formal_point": [],
         "answer": ANGLES[i % 4], "comment": "", "original_split": split, "image": {"bytes": png, "path": None}}
        for i, split in enumerate(["train", "test", "train", "test", "val"])
    ]
    features = datasets.Features(
        {
            "id": datasets.Value("int64"), "subject": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")), "label": datasets.Value("int64"),
            "formal_point": datasets.List(datasets.Value("string")), "answer": datasets.Value("string"),
            "comment": datasets.Value("string"), "original_split": datasets.Value("string"), "image": datasets.Image(),
        }
    )
    root = tmp_path / "geoqa-hub"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def test_hub_path_via_local_parquet(tmp_path):
    task = GeoQA(hf_dataset=str(_hub_copy(tmp_path)), cache_dir=str(tmp_path / "cache"))
    test = task.load("test")
    assert [(e.id, e.answer, e.question) for e in test] == [("1", "B", "Calculation: question 1"), ("3", "D", "Calculation: question 3")]
    assert test[0].load_images()[0].size == (48, 48)
    assert [e.id for e in task.load("val")] == ["4"]


# --- bad data --------------------------------------------------------------------------------------


def _copy(tmp_path: Path, mutate) -> Path:
    return copy_with_edit(FIXTURES / "geoQA-data", tmp_path / "geoQA-data", "test.jsonl", mutate)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda rows: rows[1].pop("question"), "missing field 'question'"),
        (lambda rows: rows[1].update(choices="40.0"), "field 'choices' should be list"),
        (lambda rows: rows[1].update(answer=7), "outside the 4 choices"),
        (lambda rows: rows[1].update(answer="forty"), "neither an option letter"),
        (lambda rows: rows[1].update(image="missing.png"), "image file not found"),
        (lambda rows: rows[1].update(image="..\\..\\secret.png"), "escapes the data root"),
    ],
)
def test_bad_record_names_file_and_record(tmp_path, mutate, problem):
    root = _copy(tmp_path, mutate)
    with pytest.raises(DataError) as info:
        GeoQA().load("test", data_dir=root)
    assert problem in str(info.value) and str(root / "test.jsonl") in str(info.value) and "test-1" in str(info.value)
    lenient = GeoQA(skip_bad=True)
    assert [e.id for e in lenient.load("test", data_dir=root)] == ["test-0", "test-2"]
    assert len(lenient.bad_records) == 1


def test_corrupt_file(tmp_path):
    root = _copy(tmp_path, lambda rows: None)
    (root / "test.jsonl").write_text('[{"id": "test-0"')
    with pytest.raises(DataError, match=r"test\.jsonl.*malformed JSON"):
        GeoQA().load("test", data_dir=root)
    with pytest.raises(DataError, match="none of val.jsonl"):
        GeoQA().load("val", data_dir=tmp_path / "nowhere")


# --- properties ------------------------------------------------------------------------------------

choice_lists = st.lists(st.text(min_size=1, max_size=10), min_size=2, max_size=5)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), choices=choice_lists, judge=st.sampled_from(["letter", "r3v"]))
def test_extract_and_normalize_never_raise(text, choices, judge):
    task = GeoQA(judge=judge)
    answer = task.extract(text, mc(choices))
    assert answer is None or answer in "ABCDE"[: len(choices)]
    task.normalize(text, mc(choices))


@settings(max_examples=100, deadline=None)
@given(choices=choice_lists, data=st.data(), judge=st.sampled_from(["letter", "r3v"]))
def test_gold_answer_line_is_correct(choices, data, judge):
    task = GeoQA(judge=judge)
    gold = "ABCDE"[data.draw(st.integers(0, len(choices) - 1))]
    example = mc(choices, answer=gold)
    assert task.is_correct(task.extract(task.answer_line(gold, example), example), example)
