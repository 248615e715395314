"""The data builders on hand-made pools, scored by the real clevr-synth task."""

from __future__ import annotations

import re

import pytest

from r3v.builders import (
    build_mixture,
    build_self_items,
    dedupe,
    equations_hold,
    pool_by_example,
    qa_items,
    select_sets,
)
from r3v.config import METHODS, BuildConfig
from r3v.errors import DataError
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import Sample, TrainItem
from r3v.tasks.clevr_synth import ClevrSynth

TASK = ClevrSynth()


def example(i: int = 0):
    return TASK.example("train", i)


def sample(ex, text: str, iteration: int | None, index: int) -> Sample:
    """A sample scored by the task's own extraction and scoring, as the sample store does."""
    answer = TASK.extract(text, ex)
    return Sample(
        example_id=ex.id, sample_index=index, text=text, answer=answer, correct=TASK.is_correct(answer, ex),
        model="m", sampling={}, seed=0, iteration=iteration,
    )


def right(ex, tag: str, iteration: int | None, index: int) -> Sample:
    s = sample(ex, f"Reasoning {tag}.\nAnswer: {ex.answer}", iteration, index)
    assert s.correct
    return s


def wrong(ex, tag: str, iteration: int | None, index: int) -> Sample:
    s = sample(ex, f"Reasoning {tag}.\nAnswer: {int(ex.answer) + 1}", iteration, index)
    assert not s.correct
    return s


def candidates_in(prompt: str, pool: list[Sample]) -> list[Sample]:
    """The pool samples shown in a select prompt, in the order they are numbered."""
    numbered = re.split(r"Model's prediction \d+:\n", prompt)[1:]
    by_text = {s.text.strip(): s for s in pool}
    shown = []
    for part in numbered:
        matches = [t for t in by_text if part.startswith(t)]
        assert len(matches) == 1, part
        shown.append(by_text[matches[0]])
    return shown


def kinds(items: list[TrainItem]) -> list[str]:
    return [item.kind for item in items]


def test_all_correct_gives_only_self_cot_with_newest_sample():
    ex = example()
    pool = [right(ex, "a", 1, 0), right(ex, "b", 1, 1), right(ex, "c", 2, 0)]
    result = build_self_items(TASK, [ex], pool, BuildConfig(), iteration=3)
    assert kinds(result.items) == ["cot"]
    item = result.items[0]
    assert item.prompt == TASK.cot_prompt(ex)
    assert item.target == pool[2].text  # iteration 2 beats iteration 1's higher sample index
    assert result.stats["questions_all_correct"] == 1


def test_all_wrong_gives_nothing():
    ex = example()
    pool = [wrong(ex, "a", 1, 0), wrong(ex, "b", 1, 1), wrong(ex, "c", 1, 2)]
    result = build_self_items(TASK, [ex], pool, BuildConfig(), iteration=2)
    assert result.items == []
    assert result.counts["cot"] == result.counts["refine"] == result.counts["select"] == 0
    assert result.stats["questions_all_wrong"] == 1


def test_mixed_question_gives_cot_refine_and_two_select_sets():
    ex = example()
    c_old, w_old, c_new, w_new = right(ex, "c1", 1, 0), wrong(ex, "w1", 1, 1), right(ex, "c2", 1, 2), wrong(ex, "w2", 2, 0)
    w_oldest = wrong(ex, "w0", None, 0)
    pool = [w_new, c_old, w_oldest, c_new, w_old]  # file order must not matter
    result = build_self_items(TASK, [ex], pool, BuildConfig(), iteration=3)
    assert kinds(result.items) == ["cot", "refine", "select", "select"]
    cot, refine, lean_correct, lean_wrong = result.items
    assert cot.target == c_new.text
    assert refine.prompt == refine_prompt(TASK, ex, w_new.text)
    assert refine.target == c_new.text
    # two correct available: the newest two correct plus the newest wrong
    assert sorted(s.text for s in candidates_in(lean_correct.prompt, pool)) == sorted([c_new.text, c_old.text, w_new.text])
    # two wrong available: the newest correct plus the newest two wrong
    assert sorted(s.text for s in candidates_in(lean_wrong.prompt, pool)) == sorted([c_new.text, w_new.text, w_old.text])
    for item in (lean_correct, lean_wrong):
        assert item.target == TASK.answer_line(ex.answer, ex)
        shown = candidates_in(item.prompt, pool)
        assert item.prompt == select_prompt(TASK, ex, [s.text for s in shown])


def test_one_correct_one_wrong_gives_no_three_way_select():
    ex = example()
    pool = [right(ex, "c", 1, 0), wrong(ex, "w", 1, 1)]
    assert kinds(build_self_items(TASK, [ex], pool, BuildConfig(), 2).items) == ["cot", "refine"]
    two_way = build_self_items(TASK, [ex], pool, BuildConfig(select_sizes=(2,)), 2)
    assert kinds(two_way.items) == ["cot", "refine", "select"]


def test_reference_rule_with_one_correct_and_many_wrong_gives_one_set():
    ex = example()
    pool = [right(ex, "c", 1, 0), wrong(ex, "w1", 1, 1), wrong(ex, "w2", 1, 2), wrong(ex, "w3", 2, 0)]
    selects = [i for i in build_self_items(TASK, [ex], pool, BuildConfig(), 3).items if i.kind == "select"]
    assert len(selects) == 1
    shown = candidates_in(selects[0].prompt, pool)
    assert sorted(s.text for s in shown) == sorted([pool[0].text, pool[3].text, pool[2].text])


def test_duplicates_collapse_to_their_newest_copy():
    ex = example()
    text = f"Same reasoning.\nAnswer: {ex.answer}"
    pool = [sample(ex, text, 1, 0), sample(ex, "  " + text + "\n", 1, 1), wrong(ex, "w", 1, 2)]
    deduped = build_self_items(TASK, [ex], pool, BuildConfig(), 2)
    # one distinct correct + one wrong: too few for a three-candidate set
    assert kinds(deduped.items) == ["cot", "refine"]
    assert deduped.stats["duplicates_removed"] == 1
    raw = build_self_items(TASK, [ex], pool, BuildConfig(dedup=False), 2)
    assert kinds(raw.items) == ["cot", "refine", "select"]
    shown = candidates_in(raw.items[2].prompt, pool)
    assert len(shown) == 3 and sum(s.correct for s in shown) == 2


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6])
def test_select_set_sizes(size):
    ex = example()
    pool = [right(ex, f"c{i}", 1, i) for i in range(5)] + [wrong(ex, f"w{i}", 2, i) for i in range(5)]
    selects = [i for i in build_self_items(TASK, [ex], pool, BuildConfig(select_sizes=(size,)), 3).items if i.kind == "select"]
    compositions = []
    for item in selects:
        shown = candidates_in(item.prompt, pool)
        assert len(shown) == size and len({s.text for s in shown}) == size
        compositions.append((sum(s.correct for s in shown), sum(not s.correct for s in shown)))
    expected = [(1, 1)] if size == 2 else [(size - 1, 1), (1, size - 1)]
    assert compositions == expected


def test_select_sizes_need_enough_candidates():
    ex = example()
    pool = [right(ex, "c1", 1, 0), right(ex, "c2", 1, 1), wrong(ex, "w", 1, 2)]
    result = build_self_items(TASK, [ex], pool, BuildConfig(select_sizes=(2, 3, 4, 5, 6)), 2)
    assert result.stats["select_size_2"] == 1 and result.stats["select_size_3"] == 1
    assert not any(f"select_size_{s}" in result.stats for s in (4, 5, 6))
    assert result.counts["select"] == 2


def test_one_drawn_size_per_question_covers_every_size_at_one_sizes_share():
    examples = [example(i) for i in range(60)]
    pool = [s for ex in examples for s in (*(right(ex, f"c{k}", 1, k) for k in range(5)),
                                            *(wrong(ex, f"w{k}", 2, k) for k in range(5)))]
    sizes = (2, 3, 4, 5, 6)
    every = build_self_items(TASK, examples, pool, BuildConfig(select_sizes=sizes), 3)
    drawn = build_self_items(TASK, examples, pool, BuildConfig(select_sizes=sizes, select_sizes_per_question=1), 3)
    # every size gives 2 sets a question except size 2 (one 1+1 set): 9 a question; one size gives 1-2
    assert every.counts["select"] == 9 * len(examples)
    assert len(examples) <= drawn.counts["select"] <= 2 * len(examples)
    for ex in examples:  # each question's select items share one candidate count
        shown = {len(candidates_in(i.prompt, pool)) for i in drawn.items if i.kind == "select" and i.example_id == ex.id}
        assert len(shown) == 1
    assert all(drawn.stats[f"select_size_{s}"] > 0 for s in sizes)  # 60 draws reach all five sizes
    again = build_self_items(TASK, examples, pool, BuildConfig(select_sizes=sizes, select_sizes_per_question=1), 3)
    assert [i.prompt for i in again.items] == [i.prompt for i in drawn.items]  # seeded
    next_iteration = build_self_items(TASK, examples, pool, BuildConfig(select_sizes=sizes, select_sizes_per_question=1), 4)
    assert [i.prompt for i in next_iteration.items if i.kind == "select"] != [i.prompt for i in drawn.items if i.kind == "select"]
    with pytest.raises(ValueError, match="select_sizes_per_question must be 0 .every size. to 5"):
        BuildConfig(select_sizes=sizes, select_sizes_per_question=6)


def test_select_sets_pick_newest_first():
    ex = example()
    correct = [right(ex, f"c{i}", 1, i) for i in range(3)]
    wrong_ = [wrong(ex, f"w{i}", 1, 3 + i) for i in range(3)]
    (c1, w1), (c2, w2) = select_sets(correct, wrong_, 3)
    assert [s.text for s in c1] == [correct[2].text, correct[1].text] and w1 == [wrong_[2]]
    assert c2 == [correct[2]] and [s.text for s in w2] == [wrong_[2].text, wrong_[1].text]


def test_solution_target_is_the_newest_correct_candidate():
    ex = example()
    pool = [right(ex, "c1", 1, 0), right(ex, "c2", 1, 1), wrong(ex, "w", 1, 2)]
    config = BuildConfig(select_target="solution")
    select = [i for i in build_self_items(TASK, [ex], pool, config, 2).items if i.kind == "select"][0]
    assert select.target == pool[1].text


def many_mixed_questions(count: int = 30):
    examples = [example(i) for i in range(count)]
    pool = []
    for ex in examples:
        pool += [right(ex, "c1", 1, 0), right(ex, "c2", 1, 1), wrong(ex, "w1", 1, 2), wrong(ex, "w2", 2, 0)]
    return examples, pool


def test_shuffles_are_seeded_and_positions_vary():
    examples, pool = many_mixed_questions()
    first = build_self_items(TASK, examples, pool, BuildConfig(seed=5), 2)
    again = build_self_items(TASK, examples, list(reversed(pool)), BuildConfig(seed=5), 2)
    assert first.items == again.items
    other_seed = build_self_items(TASK, examples, pool, BuildConfig(seed=6), 2)
    assert [i.prompt for i in first.items] != [i.prompt for i in other_seed.items]
    # the right candidate of the 1-correct sets must not sit at one fixed position
    positions = set()
    for item in first.items:
        shown = candidates_in(item.prompt, [s for s in pool if s.example_id == item.example_id])
        if item.kind == "select" and sum(s.correct for s in shown) == 1:
            positions.add(next(i for i, s in enumerate(shown) if s.correct))
    assert len(positions) > 1


def test_mixture_shuffle_is_seeded_per_iteration():
    examples, pool = many_mixed_questions(10)
    warm = qa_items(TASK, examples)
    a = build_mixture(TASK, examples, pool, BuildConfig(), 2, warm)
    b = build_mixture(TASK, examples, pool, BuildConfig(), 2, warm)
    c = build_mixture(TASK, examples, pool, BuildConfig(), 3, warm)
    assert a.items == b.items
    # another iteration reshuffles, but the same questions and kinds go in
    assert a.items != c.items
    assert sorted((i.kind, i.example_id) for i in a.items) == sorted((i.kind, i.example_id) for i in c.items)


@pytest.mark.parametrize("method", list(METHODS))
def test_presets(method):
    examples, pool = many_mixed_questions(4)
    result = build_self_items(TASK, examples, pool, BuildConfig.preset(method), 2)
    expected = {"cot": 4, "refine": 4 if METHODS[method]["self_refine"] else 0,
                "select": 8 if METHODS[method]["self_select"] else 0}
    assert {k: result.counts[k] for k in expected} == expected
    assert BuildConfig.preset(method).method == method


def test_star_preset_trains_self_cot_only():
    assert METHODS["star"] == {"self_cot": True, "self_refine": False, "self_select": False}
    with pytest.raises(ValueError, match="unknown method"):
        BuildConfig.preset("dpo")


def test_warmup_mixture_at_iteration_zero():
    examples = [example(i) for i in range(6)]
    distill = [TrainItem("distill", ex.id, TASK.cot_prompt(ex), TASK.teacher_rationale(ex)) for ex in examples[:2]]
    result = build_mixture(TASK, examples, [], BuildConfig(), 0, [*qa_items(TASK, examples), *distill])
    assert result.counts == {"qa": 6, "distill": 2, "cot": 0, "refine": 0, "select": 0}
    qa = {i.example_id: i for i in result.items if i.kind == "qa"}
    for ex in examples:
        assert qa[ex.id].prompt == TASK.qa_prompt(ex)
        assert qa[ex.id].target == str(ex.answer)


def test_warmup_can_be_left_out_of_later_iterations():
    examples, pool = many_mixed_questions(3)
    warm = qa_items(TASK, examples)
    kept = build_mixture(TASK, examples, pool, BuildConfig(), 1, warm)
    dropped = build_mixture(TASK, examples, pool, BuildConfig(include_warmup=False), 1, warm)
    assert kept.counts["qa"] == 3 and dropped.counts["qa"] == 0
    assert dropped.counts["cot"] == kept.counts["cot"] == 3


def test_pool_orders_by_iteration_then_index():
    ex = example()
    a, b, c, d = wrong(ex, "a", None, 5), wrong(ex, "b", 0, 9), wrong(ex, "c", 1, 0), wrong(ex, "d", 1, 1)
    assert pool_by_example([d, c, b, a])[ex.id] == [a, b, c, d]


def test_bad_pools_are_refused():
    ex = example()
    with pytest.raises(DataError, match="same \\(iteration, sample index\\) twice"):
        pool_by_example([right(ex, "a", 1, 0), wrong(ex, "b", 1, 0)])
    stranger = right(example(99), "x", 1, 0)
    with pytest.raises(DataError, match="not in the task's train split"):
        build_self_items(TASK, [ex], [stranger], BuildConfig(), 2)


def test_config_validation():
    for sizes in [(1,), (7,), ()]:
        with pytest.raises(ValueError, match="select_sizes"):
            BuildConfig(select_sizes=sizes)
    with pytest.raises(ValueError, match="select_target"):
        BuildConfig(select_target="letter")


@pytest.mark.parametrize("text, holds", [
    ("There are 7 objects. There are 3 red objects. 7 - 3 = 4.\nAnswer: 4", True),
    ("There are 7 objects. There are 3 red objects. 7 - 3 = 5.\nAnswer: 5", False),
    ("There are 2 squares. 3 + 3 = 5.\nAnswer: 5", False),
    ("2 * 3 = 6, then 6 / 4 = 1.5 and 1.5 + 1 = 2.5", True),
    ("6 / 0 = 0", False),
    ("10 / 3 = 3.33", True),  # rounded to two places, as rationales write it
    ("no arithmetic here\nAnswer: 4", True),
])
def test_equations_hold(text, holds):
    assert equations_hold(text) is holds


def test_check_equations_drops_lucky_positives():
    ex = example(0)
    total, answer = int(re.findall(r"\d+", ex.metadata["rationale"])[0]), int(ex.answer)
    sound = sample(ex, f"{ex.metadata['rationale']}\nAnswer: {answer}", 1, 0)
    lucky = sample(ex, f"{total} - 9 = {answer}.\nAnswer: {answer}", 1, 1)
    miss = wrong(ex, "w", 1, 2)
    assert sound.correct and lucky.correct and not equations_hold(lucky.text)
    plain = build_self_items(TASK, [ex], [sound, lucky, miss], BuildConfig(), iteration=2)
    assert plain.items[0].target == lucky.text  # the newest right answer, however it got there
    checked = build_self_items(TASK, [ex], [sound, lucky, miss], BuildConfig(check_equations=True), iteration=2)
    assert kinds(checked.items) == ["cot", "refine"]  # one positive left: no 3-way select set
    assert checked.items[0].target == checked.items[1].target == sound.text
    assert checked.stats["positives_failing_equations"] == 1
    assert BuildConfig(check_equations=True).to_dict()["check_equations"] is True


def test_duplicates_keep_their_newest_copy_and_that_changes_the_items():
    """Keeping the oldest copy of a duplicate would change what "newest" means afterwards.

    Pool, oldest first: A@1 (right), W@1 (wrong), B@1 (right), V@2 (wrong), A'@3 (right), W'@3 (wrong),
    where A' and W' equal A and W once stripped. Keeping the newest copies leaves B, V, A', W', so
    A' is the newest right sample and W' the newest wrong one. Keeping the oldest would leave
    A, W, B, V: B and V would be the newest, and every item below would differ.
    """
    ex = example()
    gold, off = ex.answer, int(ex.answer) + 1
    a = sample(ex, f"Count them: A.\nAnswer: {gold}", 1, 0)
    w = sample(ex, f"Count them: W.\nAnswer: {off}", 1, 1)
    b = sample(ex, f"Count them: B.\nAnswer: {gold}", 1, 2)
    v = sample(ex, f"Count them: V.\nAnswer: {off}", 2, 0)
    a_new = sample(ex, f"\n  Count them: A.\nAnswer: {gold}  \n", 3, 0)
    w_new = sample(ex, f"Count them: W.\nAnswer: {off}\n\n", 3, 1)
    assert [s.correct for s in (a, w, b, v, a_new, w_new)] == [True, False, True, False, True, False]
    pool = [w_new, b, a, v, a_new, w]  # file order must not matter

    assert dedupe(pool_by_example(pool)[ex.id]) == [b, v, a_new, w_new]
    result = build_self_items(TASK, [ex], pool, BuildConfig(), iteration=4)
    assert result.stats["duplicates_removed"] == 2
    assert kinds(result.items) == ["cot", "refine", "select", "select"]
    cot, refine, lean_correct, lean_wrong = result.items

    question = f"{ex.question}\nFirst generate a step-by-step solution, then answer the question using a single numerical value."
    text_a, text_w, text_b, text_v = (f"Count them: {t}.\nAnswer: {x}" for t, x in
                                      (("A", gold), ("W", off), ("B", gold), ("V", off)))
    assert (cot.prompt, cot.target) == (question, text_a)
    assert refine.prompt == (
        f"{question}\n\nModel's prediction:\n{text_w}\n\nThe prediction above may be wrong. Judge whether it is "
        "correct; if it is not, find the error and write a corrected step-by-step solution, then give the final answer."
    )
    assert refine.target == text_a
    # Two right (A', B) + the newest wrong (W'); then the newest right (A') + the two wrong (W', V).
    expected_sets = {"lean_correct": [text_a, text_b, text_w], "lean_wrong": [text_a, text_w, text_v]}
    for item, name in ((lean_correct, "lean_correct"), (lean_wrong, "lean_wrong")):
        shown = re.split(r"\n\nModel's prediction \d+:\n", item.prompt)
        assert shown[0] == question
        *candidates, last = shown[1:]
        last, instruction = last.split("\n\n")
        assert sorted([*candidates, last]) == sorted(expected_sets[name]), name
        assert instruction == "Which prediction is correct? Give the final answer as a single numerical value."
        assert item.target == f"Answer: {gold}"


def test_value_target_is_the_bare_gold_answer_of_the_qa_items():
    ex = example()
    pool = [right(ex, "c1", 1, 0), right(ex, "c2", 1, 1), wrong(ex, "w", 1, 2)]
    selects = [i for i in build_self_items(TASK, [ex], pool, BuildConfig(select_target="value"), 2).items
               if i.kind == "select"]
    assert selects and all(i.target == str(ex.answer) for i in selects)
    assert "Answer" not in selects[0].target
    assert selects[0].target == qa_items(TASK, [ex])[0].target


def test_the_rationale_filter_drops_short_and_answer_first_samples_everywhere():
    # Reference B's filter: a sample of 50 characters or fewer, or one opening with "Answer", is no
    # rationale; it is neither a self-CoT target, nor refine input/output, nor a select candidate.
    ex = example()
    pad = " Counting every object in the scene one by one, then the ones asked about."
    good_right = sample(ex, f"Long reasoning.{pad}\nAnswer: {ex.answer}", 1, 0)
    good_wrong = sample(ex, f"Other reasoning.{pad}\nAnswer: {int(ex.answer) + 1}", 1, 1)
    bare_right = sample(ex, f"Answer: {ex.answer}", 2, 0)  # the newest correct, but short
    first_right = sample(ex, f"Answer: {ex.answer}.{pad}", 2, 1)  # long, but opens with the answer
    short_wrong = sample(ex, f"It is {int(ex.answer) + 2}.\nAnswer: {int(ex.answer) + 2}", 2, 2)
    pool = [good_right, good_wrong, bare_right, first_right, short_wrong]
    assert [s.correct for s in pool] == [True, False, True, True, False]
    assert len(short_wrong.text) <= 50 < len(first_right.text)

    unfiltered = build_self_items(TASK, [ex], pool, BuildConfig(), 2)
    assert next(i for i in unfiltered.items if i.kind == "cot").target == first_right.text

    config = BuildConfig(rationale_min_chars=50, drop_answer_first=True)
    result = build_self_items(TASK, [ex], pool, config, 2)
    by_kind = {kind: [i for i in result.items if i.kind == kind] for kind in ("cot", "refine", "select")}
    assert [i.target for i in by_kind["cot"]] == [good_right.text]
    assert [i.target for i in by_kind["refine"]] == [good_right.text]
    assert good_wrong.text in by_kind["refine"][0].prompt
    for item in by_kind["select"]:  # only one correct and one wrong remain: no 3-candidate set
        assert set(candidates_in(item.prompt, pool)) <= {good_right, good_wrong}
    assert by_kind["select"] == []
    assert result.stats["not_rationales_removed"] == 3

    only_length = build_self_items(TASK, [ex], pool, BuildConfig(rationale_min_chars=50), 2)
    assert next(i for i in only_length.items if i.kind == "cot").target == first_right.text
    assert only_length.stats["not_rationales_removed"] == 2
    with pytest.raises(ValueError, match="rationale_min_chars"):
        BuildConfig(rationale_min_chars=-1)


def test_check_steps_keeps_only_positives_whose_every_step_the_task_accepts():
    from r3v.tasks.grid_count import GridCount

    grid = GridCount()
    ex = grid.example("train", 0)

    def scored(text: str, index: int) -> Sample:
        answer = grid.extract(text, ex)
        return Sample(example_id=ex.id, sample_index=index, text=text, answer=answer,
                      correct=grid.is_correct(answer, ex), model="m", sampling={}, seed=0, iteration=1)

    rationale = ex.metadata["rationale"]
    sound = scored(f"{rationale}\nAnswer: {ex.answer}", 0)
    # the same count, with the first row read wrong: a right answer by luck
    first_row = rationale.split(";")[0]
    misread = first_row.replace("empty", "blue circle", 1) if "empty" in first_row else first_row.replace(":", ": empty,", 1)
    lucky = scored(rationale.replace(first_row, misread, 1) + f"\nAnswer: {ex.answer}", 1)
    miss = scored(f"{rationale}\nAnswer: {int(ex.answer) + 1}", 2)
    assert sound.correct and lucky.correct and not miss.correct
    assert grid.check_steps(sound.text, ex) and not grid.check_steps(lucky.text, ex)
    plain = build_self_items(grid, [ex], [sound, lucky, miss], BuildConfig(), iteration=2)
    assert plain.items[0].target == lucky.text  # the newest right answer, however it got there
    checked = build_self_items(grid, [ex], [sound, lucky, miss], BuildConfig(check_steps=True), iteration=2)
    assert kinds(checked.items) == ["cot", "refine"]
    assert checked.items[0].target == checked.items[1].target == sound.text
    assert checked.stats["positives_failing_step_check"] == 1
    assert checked.stats["positives_passing_step_check"] == 1


def test_check_steps_is_refused_for_a_task_without_a_step_checker():
    from r3v.registry import tasks

    task = tasks.get("m3cot")()
    assert task.check_steps is None
    with pytest.raises(ValueError, match="no step checker"):
        build_self_items(task, [], [], BuildConfig(check_steps=True), iteration=1)
