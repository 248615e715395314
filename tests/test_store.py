"""The sample store: resumable by chunk, refuses foreign settings, shards merge back."""

import json

import pytest
from click.testing import CliRunner

from r3v.cli import main
from r3v.errors import DataError
from r3v.records import Sampling
from r3v.store import SampleStore, Shard, manifest_path, merge_shards, sample_examples

SAMPLE_FIELDS = {"example_id", "sample_index", "text", "answer", "correct", "model", "sampling", "seed"}


def run_store(path, backend, task, examples, settings, sampling):
    store = SampleStore(path, settings)
    return sample_examples(backend, task, examples, sampling, store, chunk_size=2)


def test_resume_after_partial_run_matches_uninterrupted(tmp_path, qwen_backend, clevr_task):
    examples = clevr_task.load("test", limit=6)
    sampling = Sampling(n=2, max_new_tokens=8, seed=3)
    settings = {"case": "resume"}
    full = tmp_path / "full.jsonl"
    run_store(full, qwen_backend, clevr_task, examples, settings, sampling)

    partial = tmp_path / "partial.jsonl"
    run_store(partial, qwen_backend, clevr_task, examples[:4], settings, sampling)
    lines = partial.read_text().splitlines(keepends=True)
    # Simulate a kill mid-write: the last chunk is half written and its last line torn.
    partial.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    run_store(partial, qwen_backend, clevr_task, examples, settings, sampling)
    records = [json.loads(line) for line in full.read_text().splitlines()]
    # the same records in the same order; only the measured seconds differ between runs
    assert [{**r, "seconds": 0} for r in map(json.loads, partial.read_text().splitlines())] == \
        [{**r, "seconds": 0} for r in records]
    assert all(r["seconds"] > 0 for r in records)
    assert len(records) == 12 and len({(r["example_id"], r["sample_index"]) for r in records}) == 12


def test_complete_store_is_not_resampled(tmp_path, clevr_task):
    class CountingBackend:
        model_id = "counting"
        calls = 0

        def generate(self, requests, sampling):
            from r3v.records import Completion

            CountingBackend.calls += 1
            return [[Completion("Answer: 1", 1, 1, "stop")] * sampling.n for _ in requests]

    examples = clevr_task.load("test", limit=3)
    path = tmp_path / "s.jsonl"
    run_store(path, CountingBackend(), clevr_task, examples, {"a": 1}, Sampling(n=2))
    calls = CountingBackend.calls
    run_store(path, CountingBackend(), clevr_task, examples, {"a": 1}, Sampling(n=2))
    assert CountingBackend.calls == calls


def test_other_settings_are_refused(tmp_path):
    SampleStore(tmp_path / "s.jsonl", {"model": "a"})
    with pytest.raises(DataError, match="other settings"):
        SampleStore(tmp_path / "s.jsonl", {"model": "b"})


def test_samples_without_manifest_are_not_trusted(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"example_id": "x"}\n')
    with pytest.raises(DataError, match="without a manifest"):
        SampleStore(path, {"model": "a"})


def test_shard_parsing_and_selection():
    assert Shard.parse("1/3").select(list(range(7))) == [1, 4]
    with pytest.raises(ValueError, match="i/k"):
        Shard.parse("3/3")


def test_generate_cli_writes_scored_samples_with_manifest(tmp_path, tiny_qwen, tiny_llava):
    for model in ("tiny-qwen2-vl", "tiny-llava"):
        out = tmp_path / f"{model}.jsonl"
        args = ["generate", "--model", model, "--task", "clevr-synth", "--split", "test", "--limit", "4",
                "--n", "2", "--max-new-tokens", "8", "--out", str(out)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 8
        assert all(SAMPLE_FIELDS <= r.keys() for r in records)
        assert {r["model"] for r in records} == {model}
        manifest = json.loads(manifest_path(out).read_text())
        assert manifest["settings"]["model"] == model and "torch" in manifest["versions"]
        assert "pass@2" in result.output


def test_sharded_generation_merges_to_the_full_set(tmp_path, tiny_qwen):
    shards = []
    for index in range(2):
        out = tmp_path / f"shard{index}.jsonl"
        args = ["generate", "--limit", "5", "--n", "1", "--max-new-tokens", "4", "--shard", f"{index}/2", "--out", str(out)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        shards.append(out)
    merged = tmp_path / "merged.jsonl"
    assert merge_shards(shards, merged) == 5
    ids = [json.loads(line)["example_id"] for line in merged.read_text().splitlines()]
    assert ids == [f"test-{i}" for i in range(5)]


def test_unknown_task_gives_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--task", "clevr-synt", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code != 0
    assert "unknown task 'clevr-synt'" in result.output and "clevr-synth" in result.output
