"""ChartQA adapter: official folder and hub schemas, R3V scoring and pix2struct relaxed accuracy."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from task_helpers import load_error, warmup_turns

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.chartqa import COT, QA, ChartQA, r3v_correct, relaxed_correct

FIXTURES = Path(__file__).parent / "fixtures" / "chartqa"
HUMAN = json.loads((FIXTURES / "test" / "test_human.json").read_text())
AUGMENTED = json.loads((FIXTURES / "test" / "test_augmented.json").read_text())


@pytest.fixture(scope="module")
def task() -> ChartQA:
    return ChartQA()


@pytest.fixture(scope="module")
def relaxed() -> ChartQA:
    return ChartQA(relaxed=True)


@pytest.fixture
def data_copy(tmp_path) -> Path:
    shutil.copytree(FIXTURES, tmp_path / "chartqa")
    return tmp_path / "chartqa"


def example(label: str | list[str]) -> Example:
    labels = [label] if isinstance(label, str) else label
    return Example("human-0", "chartqa", "q?", labels[0], metadata={"source": "human", "labels": labels})


# ------------------------------------------------------------------------------------------ loading
def test_registered_under_its_name():
    assert tasks.get("chartqa") is ChartQA


def test_load_human_by_default(task):
    loaded = task.load("test", FIXTURES)
    assert [ex.id for ex in loaded] == [f"human-{i}" for i in range(len(HUMAN))]
    for ex, record in zip(loaded, HUMAN, strict=True):
        assert (ex.question, ex.answer) == (record["query"], record["label"])
        assert ex.metadata == {"source": "human", "labels": [record["label"]], "imgname": record["imgname"]}
        assert ex.images == [str((FIXTURES / "test" / "png" / record["imgname"]).resolve())]
    assert loaded[0].load_images()[0].size == (48, 32)


def test_subsets_and_limit():
    both = ChartQA(subset="both").load("test", FIXTURES)
    assert [ex.id for ex in both] == [f"human-{i}" for i in range(len(HUMAN))] + [
        f"augmented-{i}" for i in range(len(AUGMENTED))]
    assert [ex.metadata["source"] for ex in ChartQA(subset="augmented").load("test", FIXTURES)] == ["augmented"] * 3
    assert len(ChartQA(subset="both").load("test", FIXTURES, limit=8)) == 8
    with pytest.raises(ValueError, match="subset"):
        ChartQA(subset="machine")


def test_missing_files(task, data_copy):
    (data_copy / "test" / "test_augmented.json").unlink()
    with pytest.raises(DataError, match="test_augmented.json"):
        ChartQA(subset="both").load("test", data_copy)
    with pytest.raises(DataError, match="val/val_human.json"):
        task.load("val", data_copy)
    with pytest.raises(ValueError, match="splits"):
        task.load("dev", data_copy)


def test_corrupt_and_wrongly_shaped_files(task, data_copy):
    path = data_copy / "test" / "test_human.json"
    path.write_text('[{"imgname": "bars_a.png", ')
    assert str(path) in str(load_error(task, "test", data_copy, "not valid JSON"))
    path.write_text('{"imgname": "bars_a.png"}')
    load_error(task, "test", data_copy, "JSON list")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: r.pop("query"), "missing field 'query'"),
        (lambda r: r.update(label=3), "field 'label' should be a string"),
        (lambda r: r.update(label=[]), "non-empty list"),
        (lambda r: r.update(imgname=None), "field 'imgname' should be str, got NoneType"),
    ],
)
def test_malformed_record_names_file_and_index(task, data_copy, edit, problem):
    path = data_copy / "test" / "test_human.json"
    records = json.loads(path.read_text())
    edit(records[2])
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as info:
        task.load("test", data_copy)
    assert str(path) in str(info.value) and "index 2" in str(info.value) and problem in str(info.value)


def test_skip_bad_and_missing_images(data_copy):
    path = data_copy / "test" / "test_human.json"
    records = json.loads(path.read_text())
    records[1]["query"] = 7
    path.write_text(json.dumps(records))
    (data_copy / "test" / "png" / "bars_c.png").unlink()
    task = ChartQA(skip_bad=True)
    loaded = task.load("test", data_copy)
    # record 1 is malformed; records 4-6 point at the deleted chart
    assert [ex.id for ex in loaded] == ["human-0", "human-2", "human-3"]
    assert [m.split(": ")[0].rsplit("record ", 1)[1] for m in task.bad_records] == [
        "index 1", "index 4", "index 5", "index 6"]
    assert "image file not found" in task.bad_records[1]
    assert len(ChartQA(check_images=False, skip_bad=True).load("test", data_copy)) == len(HUMAN) - 1


def test_image_names_cannot_escape(data_copy):
    path = data_copy / "test" / "test_human.json"
    path.write_text(json.dumps([{"imgname": "../../../secret.png", "query": "q", "label": "1"}]))
    with pytest.raises(DataError, match="escapes the data root"):
        ChartQA().load("test", data_copy)


def test_example_from_record(task):
    built = task.example_from_record(HUMAN[3], 3)
    assert (built.id, built.question, built.answer, built.images) == ("human-3", HUMAN[3]["query"], "green line", [])
    assert task.example_from_record({**AUGMENTED[0], "source": "augmented"}, 0).id == "augmented-0"
    with pytest.raises(DataError, match="index 4.*'label'"):
        task.example_from_record({"imgname": "a.png", "query": "q"}, 4)


# ------------------------------------------------------------------------------------------ hub
def _png_bytes(name: str) -> bytes:
    return (FIXTURES / "test" / "png" / name).read_bytes()


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> dict[str, Path]:
    """Parquet files in the two hub schemas, written by ``datasets`` from the fixture records."""
    import datasets

    folder = tmp_path_factory.mktemp("chartqa-hub")
    m4 = [
        {"image": {"bytes": _png_bytes(r["imgname"]), "path": r["imgname"]}, "query": r["query"],
         "label": [r["label"]], "human_or_machine": source}
        for source, records in ((0, HUMAN), (1, AUGMENTED)) for r in records
    ]
    m4_data = datasets.Dataset.from_list(m4).cast_column("image", datasets.Image())
    m4_data = m4_data.cast_column("human_or_machine", datasets.ClassLabel(names=["human", "machine"]))
    m4_data.to_parquet(folder / "m4.parquet")
    lmms = [
        {"type": f"{source}_test", "question": r["query"], "answer": r["label"],
         "image": {"bytes": _png_bytes(r["imgname"]), "path": None}}
        for source, records in (("human", HUMAN), ("augmented", AUGMENTED)) for r in records
    ]
    datasets.Dataset.from_list(lmms).cast_column("image", datasets.Image()).to_parquet(folder / "lmms.parquet")
    datasets.Dataset.from_list([{"q": "x", "a": "y"}]).to_parquet(folder / "other.parquet")
    return {"m4": folder / "m4.parquet", "lmms": folder / "lmms.parquet", "other": folder / "other.parquet",
            "cache": folder / "cache"}


@pytest.mark.parametrize("schema", ["m4", "lmms"])
def test_hub_schemas_load_like_the_official_files(hub_files, schema):
    kwargs = {"hf_dataset": str(hub_files[schema]), "cache_dir": str(hub_files["cache"])}
    for subset in ("human", "both"):
        from_hub = ChartQA(subset=subset, **kwargs).load("test")
        from_dir = ChartQA(subset=subset).load("test", FIXTURES)
        assert [(e.id, e.question, e.answer, e.metadata["source"], e.metadata["labels"]) for e in from_hub] == [
            (e.id, e.question, e.answer, e.metadata["source"], e.metadata["labels"]) for e in from_dir]
        for hub_ex, dir_ex in zip(from_hub, from_dir, strict=True):
            assert isinstance(hub_ex.images[0], Image.Image)
            assert hub_ex.load_images()[0].tobytes() == dir_ex.load_images()[0].tobytes()
    assert len(ChartQA(subset="augmented", **kwargs).load("test", limit=2)) == 2


def test_hub_errors(hub_files, tmp_path):
    cache = str(hub_files["cache"])
    with pytest.raises(DataError, match="unrecognised columns"):
        ChartQA(hf_dataset=str(hub_files["other"]), cache_dir=cache).load("test")
    with pytest.raises(DataError, match="cannot load"):
        ChartQA(hf_dataset=str(tmp_path / "absent" / "x.parquet"), cache_dir=cache).load("test")
    with pytest.raises(DataError, match="--data-dir"):
        ChartQA(hf_dataset="").load("test")


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_follow_r3v(task):
    ex = example("3")
    assert task.cot_prompt(ex) == "q?\nFirst generate a step-by-step solution, then answer the question with a " \
        "numerical value, Yes/No, or a word or phrase."
    assert task.qa_prompt(ex) == f"q?\n{QA}" and task.cot_prompt(ex) == f"q?\n{COT}"
    assert task.answer_line("3", ex) == "Answer: 3"
    assert task.select_instruction(ex) == (
        "Which prediction is correct? Give the final answer with a numerical value, Yes/No, or a word or phrase.")


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize(
    "output, label, extracted, r3v, canonical",
    [
        ("Answer: 3", "3", "3", True, True),
        ("Solution: ...\n\nAnswer:\n3.1", "3", "3.1", True, True),  # within 5%
        ("Answer: 3.2", "3", "3.2", False, False),  # 6.7% off
        ("Answer: -1.65", "-1.6", "-1.65", True, True),
        ("Answer: 0.0", "0", "0.0", True, False),  # a zero gold: R3V compares numbers, pix2struct strings
        ("Answer: 0.01", "0", "0.01", False, False),
        ("Answer: 57%", "0.57", "57%", False, True),  # only pix2struct reads percentages
        ("Answer: 1,216", "1216", "1,216", False, False),  # thousands separators are not numbers
        ("Answer: yes", "Yes", "yes", True, True),
        ("Answer: Green Line", "green line", "Green Line", True, True),
        ("Answer: Yes.", "Yes", "Yes.", False, False),
        ("Answer: 3\nSo Answer: 4", "3", "3\nSo Answer: 4", False, False),  # text after the FIRST "Answer:"
        ("3", "3", "3", True, True),  # a bare answer is the whole output
        ("The chart shows 3 bars.", "3", "The chart shows 3 bars.", False, False),
        ("Answer: [2003, 2009]", "[2003, 2009]", "[2003, 2009]", True, True),
    ],
)
def test_extraction_and_both_scoring_rules(task, relaxed, output, label, extracted, r3v, canonical):
    ex = example(label)
    assert task.extract(output, ex) == extracted
    assert task.is_correct(task.extract(output, ex), ex) is r3v
    assert relaxed.is_correct(relaxed.extract(output, ex), ex) is canonical


def test_unparseable_outputs(task, relaxed):
    ex = example("3")
    for output in ("", "   \n", "Answer:   "):
        assert task.extract(output, ex) is None
        assert task.is_correct(None, ex) is False and relaxed.is_correct(None, ex) is False


def test_rule_functions_on_surrounding_spaces():
    # R3V strips both sides; pix2struct compares strings as given (numbers parse either way)
    assert r3v_correct(" green line ", "green line") and not relaxed_correct(" green line ", "green line")
    assert relaxed_correct(" 3 ", "3")


def test_any_of_several_gold_labels_counts(task):
    ex = example(["3", "three"])
    assert task.is_correct("three", ex) and task.is_correct("3.0", ex) and not task.is_correct("4", ex)


def test_normalize_groups_equal_answers(task, relaxed):
    ex = example("3")
    assert task.normalize("14.0", ex) == task.normalize(" 14 ", ex) == "14"
    assert task.normalize("Yes", ex) == task.normalize("yes", ex)
    assert task.normalize("57%", ex) != task.normalize("0.57", ex)
    assert relaxed.normalize("57%", ex) == relaxed.normalize("0.57", ex)


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), label=st.text(max_size=10))
def test_extract_normalize_score_never_raise(task, relaxed, text, label):
    ex = example(label)
    for judge in (task, relaxed):
        answer = judge.extract(text, ex)
        assert answer is None or (isinstance(answer, str) and answer == answer.strip() and answer)
        assert isinstance(judge.normalize(text, ex), str)
        assert isinstance(judge.is_correct(answer, ex), bool)


def _finite_or_text(label: str) -> bool:
    # a gold "nan" or "inf" parses as a number that no relative tolerance can match
    try:
        return math.isfinite(float(label.rstrip("%")))
    except ValueError:
        return True


labels = st.one_of(
    st.text(min_size=1, max_size=20).map(str.strip),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:g}"),
    st.integers(0, 100).map(lambda n: f"{n}%"),
).filter(bool).filter(_finite_or_text)


@settings(max_examples=200, deadline=None)
@given(label=labels)
def test_answer_line_round_trips(task, relaxed, label):
    ex = example(label)
    for judge in (task, relaxed):
        assert judge.is_correct(judge.extract(judge.answer_line(label, ex), ex), ex)


# ------------------------------------------------------------------------------------------ real files
def test_real_test_human_labels_score_against_themselves(shared_fixtures, tmp_path):
    """The first 60 ChartQA test_human records: every gold scores, numbers within 5% do, beyond don't."""
    (tmp_path / "test").mkdir()
    shutil.copy(shared_fixtures / "chartqa" / "test_human_sample.json", tmp_path / "test" / "test_human.json")
    task, relaxed = ChartQA(check_images=False), ChartQA(relaxed=True, check_images=False)
    loaded = task.load("test", tmp_path)
    assert len(loaded) == 60
    for ex in loaded:
        for judge in (task, relaxed):
            assert judge.is_correct(judge.extract(f"Solution:\n1. ...\n\nAnswer:\n{ex.answer}", ex), ex), ex.id
            assert judge.is_correct(judge.extract(ex.answer, ex), ex), ex.id
        try:
            gold = float(ex.answer)
        except ValueError:
            assert not task.is_correct(ex.answer + " x", ex)
            continue
        if gold != 0:
            assert task.is_correct(repr(gold * 1.04), ex) and not task.is_correct(repr(gold * 1.06), ex), ex.id


def test_real_warmup_prompts_and_rationales(shared_fixtures):
    """R3V's GPT-distilled ChartQA warm-up: our CoT prompt is theirs, their final answers extract."""
    task = ChartQA()
    for index, (record, prompt, rationale) in enumerate(warmup_turns(shared_fixtures, "chartqa_qwenvl_sft_gpt_sample.json")):
        query = prompt.rsplit("\nFirst generate", 1)[0]
        final = rationale.rsplit("Answer:", 1)[1].strip()
        ex = task.example_from_record({"imgname": record["image"], "query": query, "label": final}, index)
        assert task.cot_prompt(ex) == prompt
        assert task.extract(rationale, ex) == final
        assert task.is_correct(task.extract(rationale, ex), ex)


# ------------------------------------------------------------------------------------------ r3v score
def test_flags_accept_text_from_the_command_line():
    assert ChartQA(relaxed="true").options.relaxed is True and ChartQA(relaxed="false").options.relaxed is False
    with pytest.raises(ValueError, match="relaxed must be true or false"):
        ChartQA(relaxed="2")


def test_example_from_record_reads_lmms_names(task):
    built = task.example_from_record({"question": "q?", "answer": "14", "type": "augmented_test"}, 2)
    assert (built.id, built.question, built.answer, built.metadata["source"]) == ("augmented-2", "q?", "14", "augmented")
    with pytest.raises(DataError, match="index 0.*source should be human or augmented"):
        task.example_from_record({"query": "q", "label": "1", "source": "machine"}, 0)


def test_score_file_breaks_down_by_source(tmp_path):
    """Official records plus predictions through ``r3v score``'s library path, human and augmented."""
    from r3v.scoring import score_file

    lines = []
    for source, records in (("human", HUMAN), ("augmented", AUGMENTED)):
        for record in records:
            lines.append(json.dumps({**record, "source": source, "prediction": f"Answer: {record['label']}"}))
    lines.append(json.dumps({**HUMAN[0], "prediction": "Answer: 4"}))  # gold 3: more than 5% off
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = score_file(ChartQA(), path)
    assert (report.n, report.correct) == (len(HUMAN) + len(AUGMENTED) + 1, len(HUMAN) + len(AUGMENTED))
    assert report.breakdown["source"]["augmented"] == {"n": len(AUGMENTED), "accuracy": 1.0}
    assert report.breakdown["source"]["human"] == {"n": len(HUMAN) + 1, "accuracy": len(HUMAN) / (len(HUMAN) + 1)}
