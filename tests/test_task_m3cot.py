"""M3CoT: the official judge_answer rules, loading (local jsonl, local parquet as a hub copy), errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r3v.errors import DataError
from r3v.records import Example
from r3v.registry import tasks
from r3v.tasks.m3cot import M3CoT

FIXTURES = Path(__file__).parent / "fixtures" / "m3cot"


def mc(choices: list[str], answer: str = "A") -> Example:
    return Example(id="q", task="m3cot", question="?", answer=answer, choices=choices)


@pytest.fixture(scope="module")
def task() -> M3CoT:
    return M3CoT()


def test_registered():
    assert tasks.get("m3cot") is M3CoT


# --- the official judge, step by step ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, choices, expected",
    [
        # step 2: the last "(X)", any case
        ("(B)</s>", ["a", "b", "c"], "B"),
        ("First (A), then on reflection (c).", ["a", "b", "c"], "C"),
        # step 1: only the [Answer] section counts, cut before [Rationale]
        ("[Answer]\n(C)\n[Rationale]\nNot (A).", ["p", "q", "r"], "C"),
        ("(A) is tempting.\n[Answer]\nr\n[Context]\n(B)", ["p", "q", "r"], "C"),
        # step 3: option text as a substring; the highest option index wins, not the latest position
        ("green is wrong; it is blue", ["blue", "green"], "B"),
        ("It is dark red.", ["red", "dark red"], "B"),
        # step 3 quirk: "no" is a substring of "know"
        ("I don't know", ["Yes", "No"], "B"),
        ("Yes.", ["Yes", "No"], "A"),
        # step 4: upper-case letter tokens after replacing \n . , ! ? by spaces
        ("I pick C.", ["x", "y", "z"], "C"),
        # step 4 splits on spaces only: "B:" is not the token "B" -> step 5: lower-case tokens
        ("Option B: maybe, or a guess", ["one", "two", "three"], "A"),
        ("option B: the slope is 5.", ["one", "two", "three"], None),
        # letters outside the options never match the gold: reported as no answer
        ("(E)", ["a", "b", "c", "d"], None),
        ("", ["x", "y"], None),
        ("hmm", ["1", "2"], None),
    ],
)
def test_official_judge(task, text, choices, expected):
    assert task.extract(text, mc(choices)) == expected


def test_is_correct_and_normalize(task):
    example = mc(["a", "b", "c"], answer="B")
    assert task.is_correct("B", example)
    assert task.is_correct(" b ", example)
    assert not task.is_correct("A", example)
    assert not task.is_correct(None, example)
    assert task.normalize(" c", example) == "C"


def test_answer_line_round_trips(task):
    example = mc(["a", "b", "c", "d"], answer="D")
    text = "Reasoning mentions (A) and (B).\n" + task.answer_line("D", example)
    assert task.extract(text, example) == "D"
    assert task.answer_line(2, example) == "Answer: (C)"


# --- loading ---------------------------------------------------------------------------------------


def test_load_local_jsonl(task):
    examples = task.load("test", data_dir=FIXTURES)
    rows = [json.loads(line) for line in (FIXTURES / "test.jsonl").read_text().splitlines()]
    assert [e.id for e in examples] == [r["id"] for r in rows]
    for example, row in zip(examples, rows, strict=True):
        assert example.answer == row["answer"]
        assert example.choices == row["choices"]
        assert example.metadata["domain"] == row["domain"] and example.metadata["topic"] == row["topic"]
        assert example.metadata["rationale"] == row["rationale"]
        assert Path(example.images[0]) == (FIXTURES / row["image"]).resolve()
        assert example.load_images()[0].size == (48, 48)
    assert len(task.load("test", data_dir=FIXTURES, limit=2)) == 2


def test_prompt_layout(task):
    with_context, without = task.load("test", data_dir=FIXTURES, limit=2)
    body = task.body(with_context)
    # M3CoT's experiment files put the question right after the context line
    assert body == (
        "[Context]\nSelect the best answer.\n[Question]\nWhich property do these three objects have in common?\n"
        "[Choices]\n(A) hard\n(B) soft\n(C) stretchy"
    )
    assert task.body(without).startswith("[Question]\nWhat season")
    assert task.cot_prompt(without).startswith(task.body(without) + "\n\nLet's think step-by-step!")
    assert task.qa_prompt(without).startswith(task.body(without))


def _parquet_copy(tmp_path: Path) -> Path:
    """The fixture as the hub lays it out: data/test-00000-of-00001.parquet with an Image column."""
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row["image"] = {"bytes": (FIXTURES / row["image"]).read_bytes(), "path": None}
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in rows[0] if k not in ("choices", "image")},
            "choices": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
        }
    )
    table = datasets.Dataset.from_list(rows, features=features)
    root = tmp_path / "hub-copy"
    (root / "data").mkdir(parents=True)
    table.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def test_hub_path_via_local_parquet(tmp_path):
    root = _parquet_copy(tmp_path)
    local = M3CoT().load("test", data_dir=FIXTURES)
    from_hub = M3CoT(hf_dataset=str(root), cache_dir=str(tmp_path / "cache")).load("test")
    from_dir = M3CoT(cache_dir=str(tmp_path / "cache")).load("test", data_dir=root, limit=1)
    assert [(e.id, e.answer, e.choices, e.metadata) for e in from_hub] == [
        (e.id, e.answer, e.choices, e.metadata) for e in local
    ]
    assert from_hub[0].load_images()[0].tobytes() == local[0].load_images()[0].tobytes()
    assert [e.id for e in from_dir] == [local[0].id]


# --- bad data --------------------------------------------------------------------------------------


def _copy(tmp_path: Path, mutate) -> Path:
    root = tmp_path / "m3cot"
    shutil.copytree(FIXTURES, root)
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    mutate(rows)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda rows: rows[1].pop("choices"), "missing field 'choices'"),
        (lambda rows: rows[1].update(answer="F"), "outside the 4 choices"),
        (lambda rows: rows[1].update(image="images/nope.png"), "image file not found"),
        (lambda rows: rows[1].update(image="../../etc/passwd"), "escapes the data root"),
        (lambda rows: rows[1].update(question=7), "field 'question' should be str"),
    ],
)
def test_bad_record_names_file_and_record(tmp_path, mutate, problem):
    root = _copy(tmp_path, mutate)
    with pytest.raises(DataError) as info:
        M3CoT().load("test", data_dir=root)
    message = str(info.value)
    assert problem in message and str(root / "test.jsonl") in message and "temporal-commonsense-7" in message
    lenient = M3CoT(skip_bad=True)
    assert [e.id for e in lenient.load("test", data_dir=root)] == ["physics-101", "algebra-12"]
    assert len(lenient.bad_records) == 1 and problem in lenient.bad_records[0]


def test_malformed_line_names_line(tmp_path):
    root = _copy(tmp_path, lambda rows: None)
    first = (root / "test.jsonl").read_text().splitlines()[0]
    (root / "test.jsonl").write_text(first + "\n{not json\n")
    with pytest.raises(DataError, match=r"test\.jsonl.*line 2.*malformed JSON"):
        M3CoT().load("test", data_dir=root)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="no validation.jsonl"):
        M3CoT().load("validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="splits"):
        M3CoT().load("dev", data_dir=tmp_path)


# --- the real sample: LLaVA-7B outputs from the M3CoT repository ----------------------------------


def test_official_sample_lines(shared_fixtures):
    from r3v.scoring import score_file

    report = score_file(M3CoT(), shared_fixtures / "m3cot" / "llava7b_cot_sample.jsonl")
    assert report.n == 40 and not report.skipped
    verdicts = {v.line: (v.answer, v.correct) for v in report.verdicts}
    # worked out by hand from messages[-1] of each line
    assert verdicts[1] == ("B", True)  # "(B)</s>", gold B
    assert verdicts[9] == (None, False)  # "...option B: the slope..." -> no "(X)", "B:" is no token
    assert verdicts[18] == ("A", True)  # "...is (A) LL.</s>", gold A
    assert verdicts[33] == ("A", False)  # "The correct answer is (A) 5.</s>", gold D
    assert verdicts[35] == ("A", False)  # no letter or option text; the lower-case token "a" -> A
    assert verdicts[37] == ("D", False)  # "(D) temperate maritime climate</s>", gold C
    assert report.breakdown["domain"]["science"]["n"] == 27


# --- properties ------------------------------------------------------------------------------------

choice_lists = st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), choices=choice_lists)
def test_extract_and_normalize_never_raise(task, text, choices):
    answer = task.extract(text, mc(choices))
    assert answer is None or answer in "ABCDEF"[: len(choices)]
    task.normalize(text, mc(choices))


@settings(max_examples=100, deadline=None)
@given(choices=choice_lists, data=st.data())
def test_gold_answer_line_is_correct(task, choices, data):
    gold = "ABCDEF"[data.draw(st.integers(0, len(choices) - 1))]
    example = mc(choices, answer=gold)
    assert task.is_correct(task.extract(task.answer_line(gold, example), example), example)
