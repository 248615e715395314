"""Every switch that restores a reference behaviour (docs/reference.md), each against an oracle
written from the reference code, not from r3v's implementation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from r3v.builders import build_self_items
from r3v.config import BuildConfig
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import Example, Sample
from r3v.reference import REFERENCE_A, REFERENCE_B, reference_settings
from r3v.tasks.base import build_task

GEO_CHOICES = ["30°", "40°", "50°", "60°"]


def geo_example(answer: str = "C", index: int = 0) -> Example:
    return Example(id=f"test-{index}", task="geoqa", question="Calculation: In the figure, find the angle x.",
                   answer=answer, choices=GEO_CHOICES)


def tab_example(index: int = 0) -> Example:
    return Example(id=f"tab-{index}", task="tabmwp", question="Which is the cheapest?", answer="apple",
                   choices=["pear", "apple", "plum"],
                   metadata={"unit": None, "ques_type": "multi_choice", "ans_type": "extractive_text", "grade": "1-6"})


# ---------------------------------------------------------------- GeoQA's default judge


@pytest.mark.parametrize(("output", "letter"), [
    ("So the angle is 50°.\nAnswer: d", "D"),  # lower-case letter after the marker
    ("Answer: (b).", "B"),
    ("a", "A"),  # a bare letter
    ("The angle doubles.\nc", "C"),
    ("答案：B", "B"),  # full-width colon, Chinese marker
    ("角度为50°，答案：C", "C"),
    ("Answer：D", "D"),  # full-width colon after the English marker
    ("The answer is （A）", "A"),  # full-width brackets
    ("Answer: Ｂ", "B"),  # a full-width letter
    ("Answer: C", "C"),
])
def test_the_letter_judge_reads_every_unambiguous_answer(output, letter):
    task = build_task("geoqa")
    example = geo_example()
    assert task.extract(output, example) == letter
    assert task.is_correct(task.extract(output, example), example) == (letter == "C")


@pytest.mark.parametrize("output", [
    "The answer is a right angle, so it cannot be found.",  # "a" is a word here
    "Answer: 45.0",  # a number that is no option: no letter R
    "Answer: E",  # outside the four options
    "I cannot tell.",
    "",
])
def test_the_letter_judge_reads_nothing_where_the_answer_is_ambiguous(output):
    assert build_task("geoqa").extract(output, geo_example()) is None


def test_the_letter_judge_still_reads_an_option_written_out():
    assert build_task("geoqa").extract("Answer: 40.0", geo_example()) is None  # "40.0" is not "40°"
    task = build_task("geoqa")
    example = Example(id="n", task="geoqa", question="q", answer="B", choices=["30", "40", "50", "60"])
    assert task.extract("Answer: 40.0", example) == "B"


# ---------------------------------------------------------------- official scoring


def reference_judge(text: str, choices: list[str]) -> str | None:
    """hhhwmws0117/MM-self-improve-qwen2vl data_process/geoqa/calculate.py ``judge_answer`` up to
    its random branch, transcribed step by step (None where it draws)."""
    import re

    if "answer" in text:
        text = text.split("answer")[-1]
    res = re.findall(r"\(([A-Za-z])\)", text) or re.findall(r"([A-Za-z])", text)
    if res:
        return res[-1].upper()
    res = [chr(65 + i) for i, c in enumerate(choices) if c.lower() in text.lower()]
    if res:
        return res[-1]
    spaced = re.sub(r"[\n.,!?]", " ", text).split(" ")
    res = [chr(65 + i) for i in range(len(choices)) if chr(65 + i) in spaced]
    if res:
        return res[-1]
    res = [chr(65 + i) for i in range(len(choices)) if chr(65 + i).lower() in spaced]
    return res[-1] if res else None


def test_official_geoqa_scoring_is_the_reference_judge_with_a_seeded_coin():
    official = build_task("geoqa", {"scoring": "official"})
    default = build_task("geoqa")
    example = geo_example("C")
    # where the reference reads a letter, official scoring reads the same one
    for text in ["Answer: 40.0", "answer: (d) since", "It is 30°", "x = 7. So B", "Answer: C"]:
        letter = reference_judge(text, GEO_CHOICES)
        assert letter is not None
        got = official.extract(text, example)
        assert got == (letter if letter in "ABCD" else None), text
    # its accident: "Answer: 40.0" reads R (no "answer" in lower case to cut at), wrong, never credited
    assert reference_judge("Answer: 40.0", GEO_CHOICES) == "R" and official.extract("Answer: 40.0", example) is None
    # where it draws, the gold letter comes out with probability 0.75, the same on every rescoring
    draws = [f"{i} + {i} = {2 * i}." for i in range(400)]
    assert all(reference_judge(text, GEO_CHOICES) is None for text in draws)
    verdicts = [official.extract(text, example) for text in draws]
    assert set(verdicts) == {"C", None}
    share = verdicts.count("C") / len(verdicts)
    assert 0.66 < share < 0.84  # 0.75 within four standard deviations of 400 draws
    assert [official.extract(text, example) for text in draws] == verdicts
    reseeded = build_task("geoqa", {"scoring": "official", "scoring_seed": 1})
    assert [reseeded.extract(text, example) for text in draws] != verdicts
    assert all(default.extract(text, example) is None for text in draws)  # r3v: never credited


def test_official_tabmwp_scoring_picks_option_a_for_nothing_and_draws_for_a_letter_past_the_options():
    official = build_task("tabmwp", {"scoring": "official"})
    default = build_task("tabmwp")
    example = tab_example()
    # PromptPG's extract_prediction: no pattern and no word overlap -> argmax of zeros -> option A
    assert official.extract("", example) == "pear"
    assert official.extract("   \n", example) == "pear"
    assert default.extract("", example) is None
    # "E" is a letter of A-F but names no option of three: a random option, seeded per output
    outputs = [f"Step {i}: compare the prices.\nAnswer: E" for i in range(60)]
    picks = [official.extract(text, example) for text in outputs]
    assert set(picks) == {"pear", "apple", "plum"}
    assert [official.extract(text, example) for text in outputs] == picks
    assert max(Counter(picks).values()) < 40
    # r3v skips the pattern; nothing else matches, so the word-overlap rule gives option A
    assert {default.extract(text, example) for text in outputs} == {"pear"}
    # a letter outside A-F is skipped by both
    assert official.extract("Answer: G", example) == default.extract("Answer: G", example)


# ---------------------------------------------------------------- prompts


def test_reference_a_prompts_are_the_official_codes_wording():
    task = build_task("tabmwp", {"prompts": "reference"})
    example = tab_example()
    question = task.cot_prompt(example)
    assert task.reference is REFERENCE_A
    # pos_neg_process_tabmwp.py: question + "\n" + "Model's prediction:\n" + neg + "\n" + system_message
    assert refine_prompt(task, example, "It is a pear.\nAnswer: A") == (
        question + "\nModel's prediction:\nIt is a pear.\nAnswer: A\n"
        "Judge the correctness of the model's prediction and refine it."
    )
    # question + "\n" + "Model's prediction 1:\n" + c1 + "\n" ... + "Model's prediction 3:\n" + c3 + "\n" + system_message
    assert select_prompt(task, example, ["one", "two", "three"]) == (
        question + "\nModel's prediction 1:\none\nModel's prediction 2:\ntwo\nModel's prediction 3:\nthree\n"
        "Which prediction has the right OCR, reasoning and calculations? Give the final answer."
    )
    chart = build_task("chartqa", {"prompts": "reference"})
    chart_example = Example(id="c", task="chartqa", question="What is the peak?", answer="7")
    assert select_prompt(chart, chart_example, ["a", "b"]).endswith(
        "Model's prediction 2:\nb\nWhich prediction is correct? Give the final answer with a numerical value, "
        "Yes/No, or a word or phrase.")


def test_reference_b_prompts_are_the_qwen2_vl_codes_wording():
    task = build_task("geoqa", {"prompts": "reference"})
    example = geo_example()
    assert task.reference is REFERENCE_B
    # merge_data.py gen_question: "{question}\nAnswer the question with Chain-of-Thought."
    problem = (f"{example.question}\nChoices:\n(A) 30°\n(B) 40°\n(C) 50°\n(D) 60°\n"
               "Answer the question with Chain-of-Thought.")
    # problem + "\nModel's Predicion: " + neg + "\nJudge the correctness of the model's prediction and refine it."
    assert refine_prompt(task, example, "x is 30°.\nAnswer: A") == (
        problem + "\nModel's Predicion: x is 30°.\nAnswer: A\nJudge the correctness of the model's prediction and refine it."
    )
    # f"{problem}\n" + "\n".join(f"Model's Prediction {k}: {pred}") + "\nWhich prediction is correct? ..."
    assert select_prompt(task, example, ["p", "q", "r"]) == (
        problem + "\nModel's Prediction 1: p\nModel's Prediction 2: q\nModel's Prediction 3: r\n"
        "Which prediction is correct? Give the final answer for the beginning question by selecting the correct option."
    )


def test_r3v_prompts_stay_the_default_and_reference_ones_reach_the_built_items():
    default, reference = build_task("clevr-synth"), build_task("clevr-synth", {"prompts": "reference"})
    example = default.example("train", 0)
    wrong = Sample(example_id=example.id, sample_index=0, text="Reasoning.\nAnswer: 99", answer="99",
                   correct=False, model="m", sampling={}, seed=0, iteration=1)
    right = Sample(example_id=example.id, sample_index=1, text=f"Reasoning.\nAnswer: {example.answer}",
                   answer=str(example.answer), correct=True, model="m", sampling={}, seed=0, iteration=1)
    items = {task.prompt_style: build_self_items(task, [example], [wrong, right], BuildConfig(), 2).items
             for task in (default, reference)}
    refine = {style: next(i for i in built if i.kind == "refine") for style, built in items.items()}
    assert "\n\nModel's prediction:\n" in refine["r3v"].prompt
    assert refine["reference"].prompt.endswith("\nJudge the correctness of the model's prediction and refine it.")
    assert "\n\n" not in refine["reference"].prompt.split(default.cot_prompt(example))[1]


# ---------------------------------------------------------------- --reference as settings


def test_reference_settings_undo_every_difference_per_release():
    a, b = reference_settings(REFERENCE_A), reference_settings(REFERENCE_B)
    for settings in (a, b):
        assert settings["task"]["args"] == {"prompts": "reference", "scoring": "official"}
        assert settings["eval"]["select"] == {"skip_when_agree": False, "unparseable": "wrong"}
    assert a["train"]["loss_mean"] == "micro_batch" and b["train"]["loss_mean"] == "global"
    assert (a["build"]["rationale_min_chars"], a["build"]["drop_answer_first"]) == (0, False)
    assert (b["build"]["rationale_min_chars"], b["build"]["drop_answer_first"]) == (50, True)
    targets = {name: build_task(name).reference.select_target for name in ("tabmwp", "chartqa", "clevr-math", "geoqa")}
    assert targets == {"tabmwp": "answer", "chartqa": "value", "clevr-math": "value", "geoqa": "answer"}


def test_official_tabmwp_scoring_maps_an_unevaluable_number_to_zero():
    example = Example(id="z", task="tabmwp", question="How many?", answer="0",
                      metadata={"unit": None, "ques_type": "free_text", "ans_type": "integer_number", "grade": "1-6"})
    official, default = build_task("tabmwp", {"scoring": "official"}), build_task("tabmwp")
    # PromptPG's normalize_answer: float("1/0") raises, and R3V's copy returns "0"
    assert official.is_correct(official.extract("Answer: 1/0", example), example)
    assert not default.is_correct(default.extract("Answer: 1/0", example), example)


@pytest.mark.parametrize("name", ["tabmwp", "chartqa", "clevr-math", "clevr-synth", "m3cot", "geoqa"])
def test_the_cot_instruction_option_replaces_the_instruction_line(name, clevr_task):
    # reference A prompted LLaVA-1.5 with "Let's think step by step." after the question
    plain, llava = build_task(name), build_task(name, {"cot_instruction": "Let's think step by step."})
    example = (clevr_task.example("test", 0) if name == "clevr-synth" else
               Example(id="e", task=name, question="What is shown?", answer="A", choices=["x", "y"]))
    ours, theirs = plain.cot_prompt(example), llava.cot_prompt(example)
    assert theirs.endswith("\nLet's think step by step.") and ours.rsplit("\n", 1)[1] not in theirs
    # the question block above the instruction is unchanged
    assert theirs.rsplit("\n", 1)[0].rstrip("\n") == ours.rsplit("\n", 1)[0].rstrip("\n")


# ---------------------------------------------------------------- the --reference flag in the commands


def test_score_with_reference_uses_the_official_judge_and_records_it(tmp_path):
    import json

    from click.testing import CliRunner

    from r3v.cli import main

    predictions = Path(__file__).parent / "fixtures" / "geoqa" / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    runs = {}
    for flags in ((), ("--reference",)):
        out = tmp_path / f"verdicts{len(flags)}.jsonl"
        result = CliRunner().invoke(main, ["score", "--task", "geoqa", str(predictions), "--json", "--out", str(out),
                                           *flags])
        assert result.exit_code == 0, result.output
        runs[flags] = json.loads(result.output), [json.loads(line) for line in out.read_text().splitlines()]
    (plain, _), (official, verdicts) = runs[()], runs[("--reference",)]
    assert plain["scoring"] == "r3v" and (official["scoring"], official["scoring_seed"]) == ("official", 0)
    for record, verdict in zip(records, verdicts, strict=True):
        gold = record["answer"] if isinstance(record["answer"], str) else "ABCD"[record["answer"]]
        letter = reference_judge(record["prediction"], record["choices"])
        if letter is not None:  # no draw: the reference's verdict exactly
            assert verdict["correct"] == (letter == gold), record["id"]
    assert official["accuracy"] < plain["accuracy"]  # "Answer: 5.0" and friends: the official judge's accidents


def test_bench_with_reference_selects_as_the_reference_and_records_it(tmp_path):
    import json

    from click.testing import CliRunner

    from r3v.cli import main

    args = ["bench", "--model", "tiny-qwen2-vl", "--task", "clevr-synth", "--n", "2", "--limit", "2",
            "--max-new-tokens", "4", "--n-ladder", "2", "--json"]
    out = tmp_path / "ref"
    result = CliRunner().invoke(main, [*args, "--reference", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["select"] == {"skip_when_agree": False, "unparseable": "wrong"}
    assert results["reference"] is True
    assert results["task_args"] == ["prompts=reference", "scoring=official"]
    # the random tiny model agrees with itself or writes nothing readable: never skipped, never a vote
    counts = results["counts"]["self-select"]
    assert counts["skipped"] == 0 and counts["fallback"] == 0 and counts["model"] + counts["unparseable"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["select"] == results["select"] and manifest["settings"]["reference"] is True
    # a finer switch beats --reference
    result = CliRunner().invoke(main, [*args, "--reference", "--skip-when-agree", "--out", str(tmp_path / "mixed")],
                                catch_exceptions=False)
    assert json.loads((tmp_path / "mixed" / "results.json").read_text())["select"]["skip_when_agree"] is True


def test_a_task_with_no_distilled_cot_starts_from_the_base_model(tmp_path):
    import json

    from click.testing import CliRunner

    from r3v.cli import main
    from r3v.records import read_jsonl

    args = ["train", "--iterations", "0", "--model", "tiny-qwen2-vl", "--train-limit", "2", "--test-limit", "1",
            "--max-new-tokens", "4", "--epochs", "1", "--training-process", "inline"]
    steps = {}
    for teacher in (0, 2):
        out = tmp_path / f"teacher{teacher}"
        result = CliRunner().invoke(main, [*args, "--teacher-count", str(teacher), "--out", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        steps[teacher] = read_jsonl(out / "metrics.jsonl")[0]["train_steps"]
        settings = json.loads((out / "run.json").read_text())["settings"]
        assert settings["skip_warmup_train"] is (teacher == 0)
    assert steps[0] == 0 and steps[2] > 0  # QA alone is no warm-up: reference B samples the base model


@pytest.mark.parametrize(("family", "expected"), [
    # qwen2vl_lora_sft_geoqa.yaml (LLaMA-Factory: lora_rank 8, alpha 2 x rank, dropout 0 by default)
    ("qwen2-vl", {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "weight_decay": 0.05, "warmup_ratio": 0.1,
                  "adam_beta2": 0.98, "adam_epsilon": 1e-6, "learning_rate": 3e-5, "epochs": 3, "max_pixels": 768 * 768}),
    # scripts/sft_qwenvl.sh
    ("qwen-vl", {"lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "weight_decay": 0.05, "warmup_ratio": 0.1,
                 "adam_beta2": 0.98, "adam_epsilon": 1e-6, "learning_rate": 3e-5, "epochs": 3}),
    # scripts/sft_llava.sh
    ("llava", {"lora_r": 128, "lora_alpha": 256, "lora_dropout": 0.05, "weight_decay": 0.0, "warmup_ratio": 0.03,
               "adam_beta2": 0.98, "adam_epsilon": 1e-6, "learning_rate": 3e-5, "epochs": 3}),
])
def test_the_family_presets_are_the_reference_scripts_settings(family, expected):
    from r3v.models.presets import reference_preset

    preset = reference_preset(family)
    assert {key: getattr(preset, key) for key in expected} == expected
    assert (preset.global_batch, preset.batch_size, preset.lr_scheduler) == (64, 2, "constant_with_warmup")
