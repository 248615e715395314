"""The bench: selection at every k from one sample set, its files, reuse of samples, and the CLI."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from volatile import without_seconds

from r3v.bench import (
    BenchConfig,
    MissingExtraError,
    default_out_dir,
    evaluate_selection,
    plot_accuracy,
    run_bench,
)
from r3v.cli import main
from r3v.errors import DataError
from r3v.metrics import pass_at_k
from r3v.records import Sample, Sampling
from r3v.store import manifest_path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hand_samples(example, answers: list[str | None]) -> list[Sample]:
    return [
        Sample(example_id=example.id, sample_index=i, text=f"Answer: {a}", answer=a,
               correct=a == example.answer, model="hand-made", sampling={}, seed=0)
        for i, a in enumerate(answers)
    ]


@pytest.fixture(scope="module")
def three(clevr_task):
    return clevr_task.load("test", limit=3)


def test_selection_ladder_from_one_sample_set(clevr_task, three):
    a, b, c = three
    w = lambda ex, d=1: str(int(ex.answer) + d)  # noqa: E731  (a wrong answer for ex)
    samples = (
        # right, then outvoted 2-1 in the first 3, then right 3-2 over all 5
        hand_samples(a, [a.answer, w(a), w(a), a.answer, a.answer])
        # 1-1 tie in the first 3 (after an abstention) goes to the wrong answer, seen first; 2-2 tie over 5 too
        + hand_samples(b, [w(b), b.answer, None, b.answer, w(b)])
        # nothing parseable
        + hand_samples(c, [None] * 5)
    )
    out = evaluate_selection(None, clevr_task, three, samples, ks=[1, 3, 5],
                             selector_names=["first", "majority", "oracle"])
    ladder = out["ladder"]
    assert [ladder[k]["first@" + k] for k in ("1", "3", "5")] == [1 / 3] * 3
    assert [ladder[k]["maj@" + k] for k in ("1", "3", "5")] == [1 / 3, 0.0, 1 / 3]
    assert [ladder[k]["oracle@" + k] for k in ("1", "3", "5")] == [1 / 3, 2 / 3, 2 / 3]
    for k in (1, 3, 5):
        assert ladder[str(k)][f"pass@{k}"] == pytest.approx((pass_at_k(5, 3, k) + pass_at_k(5, 2, k)) / 3)
    assert out["accuracy"] == {"first": 1 / 3, "majority": 1 / 3, "oracle": 2 / 3}
    assert out["examples"] == 3 and out["samples"] == 15 and out["n"] == 5
    assert out["counts"]["majority"] == {"model": 0, "skipped": 0, "fallback": 0, "unparseable": 0, "rule": 3}
    assert out["skipped"] == 0 and out["fallback"] == 0
    assert set(out["breakdown"]["template"]) == {ex.metadata["template"] for ex in three}
    json.dumps(out)  # JSON-ready


def test_missing_samples_name_the_example(clevr_task, three):
    samples = [s for ex in three for s in hand_samples(ex, ["1", "2", "3"])][:-1]
    with pytest.raises(DataError, match=f"record {three[-1].id}.*2 samples.*needs 3"):
        evaluate_selection(None, clevr_task, three, samples, ks=[1, 3], selector_names=["first"])


def test_run_bench_writes_results_and_reuses_its_samples(clevr_task, qwen_backend, tmp_path):
    examples = clevr_task.load("test", limit=4)
    config = BenchConfig(sampling=Sampling(n=2, max_new_tokens=6, seed=1), ladder=(1, 3),
                         selectors=("first", "majority", "self-select", "oracle"))
    identity = {"model": "tiny-qwen2-vl", "adapter": None, "backend": "hf", "task": "clevr-synth",
                "split": "test", "limit": 4, "data_dir": None}
    results = run_bench(qwen_backend, clevr_task, examples, config, tmp_path, identity)

    samples = tmp_path / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 8 and manifest_path(samples).exists()
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["selectors"] == list(config.selectors)
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [i["example_id"] for i in items] == [ex.id for ex in examples]
    for item, ex in zip(items, examples, strict=True):
        assert item["gold"] == ex.answer and len(item["candidates"]) == 2
        assert set(item["selectors"]) == set(config.selectors)
        for choice in item["selectors"].values():
            assert choice["how"] in {"model", "skipped", "fallback", "rule"}
    assert results["ks"] == [1, 2]  # the ladder capped at N=2, with N itself
    assert results["samples"] == 8 and results["examples"] == 4
    for k, counts in results["counts_by_k"].items():
        assert sum(counts["self-select"].values()) == 4, k
    # items at N agree with the reported accuracy
    for name in config.selectors:
        assert results["accuracy"][name] == sum(i["selectors"][name]["correct"] for i in items) / 4

    before = digest(samples)
    again = run_bench(qwen_backend, clevr_task, examples, config, tmp_path, identity)
    assert digest(samples) == before
    assert without_seconds(again) == without_seconds(results)  # the select calls are timed anew

    other = BenchConfig(sampling=Sampling(n=2, max_new_tokens=7, seed=1))
    with pytest.raises(DataError, match="other settings"):
        run_bench(qwen_backend, clevr_task, examples, other, tmp_path, identity)
    assert default_out_dir(identity, other) != default_out_dir(identity, config)


def test_plot_draws_one_line_per_selector(clevr_task, three, tmp_path):
    samples = [s for ex in three for s in hand_samples(ex, [ex.answer, "99", ex.answer])]
    results = evaluate_selection(None, clevr_task, three, samples, ks=[1, 2, 3],
                                 selector_names=["first", "majority", "oracle"])
    results.update(task="clevr-synth", model="hand-made")
    png = plot_accuracy(results, tmp_path / "plot" / "accuracy_vs_n.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_plot_without_matplotlib_says_which_extra_to_install(clevr_task, three, tmp_path, monkeypatch):
    samples = [s for ex in three for s in hand_samples(ex, [ex.answer])]
    results = evaluate_selection(None, clevr_task, three, samples, ks=[1], selector_names=["first"])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an install without matplotlib sees
    with pytest.raises(MissingExtraError, match=r"r3v\[plot\]"):
        plot_accuracy(results, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


BENCH = ["bench", "--model", "tiny-qwen2-vl", "--task", "clevr-synth", "--selector", "self-select",
         "--n", "3", "--limit", "8", "--max-new-tokens", "24", "--json",
         # only k = N, and a short select call: the test is about the CLI, not the model
         "--n-ladder", "3", "--select-max-new-tokens", "8"]


def test_cli_json_rerun_reuses_samples_and_plots(qwen_backend, tmp_path):
    runner = CliRunner()
    out = tmp_path / "bench"
    first = runner.invoke(main, [*BENCH, "--out", str(out), "--plot"])
    assert first.exit_code == 0, first.output
    results = json.loads(first.stdout)  # stdout holds the JSON and nothing else
    assert results["samples"] == 24 and results["examples"] == 8 and results["n"] == 3
    assert set(results["accuracy"]) == {"first", "majority", "self-select", "oracle"}
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
    counts = results["counts"]["self-select"]
    assert counts["model"] + counts["skipped"] + counts["fallback"] == 8
    assert results["skipped"] == counts["skipped"] and results["fallback"] == counts["fallback"]
    assert results["fallback"] > 0  # the untrained tiny model writes no parseable answer
    assert "24 new samples" in first.stderr
    with Image.open(out / "accuracy_vs_n.png") as image:
        assert image.format == "PNG"

    samples = out / "samples.jsonl"
    before = digest(samples)
    second = runner.invoke(main, [*BENCH, "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert digest(samples) == before
    assert "0 new samples generated (24 reused)" in second.stderr
    assert json.loads(second.stdout)["accuracy"] == results["accuracy"]


def test_cli_table_and_bad_options(qwen_backend, tmp_path):
    runner = CliRunner()
    args = ["bench", "--n", "2", "--limit", "2", "--max-new-tokens", "6", "--n-ladder", "1,2", "--out", str(tmp_path)]
    shown = runner.invoke(main, args)
    assert shown.exit_code == 0, shown.output
    for header in ("Test@1", "maj@k", "sel@k", "pass@k", "At N=2"):
        assert header in shown.stdout
    bad = runner.invoke(main, [*args, "--n-ladder", "1,two"])
    assert bad.exit_code == 2 and "--n-ladder" in bad.output
    unknown = runner.invoke(main, [*args, "--selector", "self_select"])
    assert unknown.exit_code == 1 and "Did you mean 'self-select'" in unknown.output

