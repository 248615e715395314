"""The trainer end to end on the tiny models: losses, LoRA scope, checkpoints, resume, NaN stop, outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from r3v.backends.hf import HFBackend
from r3v.config import TrainConfig
from r3v.models.loading import load_model
from r3v.models.presets import preset_for_model, reference_preset, tiny_preset
from r3v.prompts import refine_prompt, select_prompt
from r3v.records import OBJECTIVES, Request, Sampling, TrainItem
from r3v.train.data import CompletionCollator, ItemDataset
from r3v.train.trainer import (
    DONE_FILE,
    LOG_FILE,
    VISION_TOWER_PATTERN,
    NonFiniteLossError,
    TrainResult,
    objective_token_losses,
    prepare_model,
    train,
)

WEIGHTS = {"sft": 1.0, "refine": 0.5, "select": 2.0}


@pytest.fixture(scope="module")
def data(clevr_task):
    """Eight items covering the three objectives, one per example."""
    task = clevr_task
    examples = task.load("train", limit=8)
    kinds = ["qa", "cot", "refine", "qa", "select", "cot", "refine", "qa"]
    items = []
    for kind, ex in zip(kinds, examples, strict=True):
        if kind == "qa":
            items.append(TrainItem(kind, ex.id, task.qa_prompt(ex), task.answer_line(ex.answer, ex)))
        elif kind == "cot":
            items.append(TrainItem(kind, ex.id, task.cot_prompt(ex), task.teacher_rationale(ex)))
        elif kind == "refine":
            wrong = "There are 9 objects.\nAnswer: 9"
            items.append(TrainItem(kind, ex.id, refine_prompt(task, ex, wrong), task.teacher_rationale(ex)))
        else:
            candidates = ["Answer: 9", task.teacher_rationale(ex), "Answer: 7"]
            items.append(TrainItem(kind, ex.id, select_prompt(task, ex, candidates), str(ex.answer)))
    return items, {ex.id: ex for ex in examples}


def lora_config(**changes) -> TrainConfig:
    # 8 items, 4 per micro-batch, 2 micro-batches per step: one optimizer step per epoch.
    base = TrainConfig(lora_r=4, lora_alpha=8, epochs=2, learning_rate=2e-3, warmup_ratio=0.0,
                       lr_scheduler="constant", batch_size=4, global_batch=8, logging_steps=1, loss_weights=WEIGHTS)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def lora_run(tiny_qwen, data, tmp_path_factory):
    items, examples = data
    out = tmp_path_factory.mktemp("lora")
    return train(tiny_qwen, items, examples, lora_config(), out), out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def adapter_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.output_path) / "adapter_model.safetensors"))


def test_step_loss_is_the_weighted_per_objective_token_sum_over_all_target_tokens(lora_run, tiny_qwen, data):
    _, out = lora_run
    items, examples = data
    first = read_log(out)[0]
    assert first["step"] == 1 and first["target_tokens"] > 0

    # Independently: the untouched model's own (HF) token-mean loss per objective over all items.
    # Step 1 sees every item (8 = 4 x 2 micro-batches) with the initial weights (LoRA B starts at 0).
    lm = load_model(tiny_qwen)
    dataset = ItemDataset(lm.processor, items, examples, max_length=2048)
    batch = CompletionCollator(lm.processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    objective = batch.pop("objective")
    expected_sum, expected_tokens = 0.0, 0
    with torch.no_grad():
        for index, name in enumerate(OBJECTIVES):
            sub = _rows_with_their_pixels(batch, objective == index)
            mean = float(lm.model(**sub).loss)
            tokens = int((sub["labels"][:, 1:] != -100).sum())
            assert first[f"loss_{name}"] == pytest.approx(mean, rel=1e-5)
            assert first[f"tokens_{name}"] == tokens
            expected_sum += WEIGHTS[name] * mean * tokens
            expected_tokens += tokens
        assert first["target_tokens"] == expected_tokens
        assert first["loss"] == pytest.approx(expected_sum / expected_tokens, rel=1e-5)

        # The loss the Trainer back-propagated and logged is that same number.
        state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        logged = [entry for entry in state["log_history"] if "loss" in entry]
        assert logged[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)
        assert {f"loss_{name}" for name in OBJECTIVES} <= logged[0].keys()

        # With weights all 1 the combination is the plain token mean the model itself computes.
        labels = batch.pop("labels")
        logits = lm.model(**batch).logits
        sums, counts = objective_token_losses(logits, labels, objective)
        plain = float(lm.model(**batch, labels=labels).loss)
        assert float(sums.sum() / counts.sum()) == pytest.approx(plain, rel=1e-5)


def _rows_with_their_pixels(batch: dict, rows: torch.Tensor) -> dict:
    """The rows of one objective, with the pixel rows of their own images (Qwen2-VL packs patches)."""
    patches = batch["image_grid_thw"].prod(dim=1)
    ends = patches.cumsum(0)
    keep = torch.cat([torch.arange(int(e - p), int(e)) for e, p, r in zip(ends, patches, rows, strict=True) if r])
    sub = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    sub["pixel_values"] = batch["pixel_values"][keep]
    sub["image_grid_thw"] = batch["image_grid_thw"][rows]
    return sub


def test_outputs_log_and_result(lora_run, data):
    result, out = lora_run
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2] and result.steps == 2
    assert result.is_adapter and Path(result.output_path) == out / "adapter"
    assert result.items_per_objective == {"sft": 5, "refine": 2, "select": 1}
    assert result.tokens == sum(r["tokens"] for r in log) and result.target_tokens == 2 * log[0]["target_tokens"]
    for name in OBJECTIVES:  # token-weighted mean of the per-step losses
        expected = sum(r[f"loss_{name}"] * r[f"tokens_{name}"] for r in log) / sum(r[f"tokens_{name}"] for r in log)
        assert result.losses[name] == pytest.approx(expected)
    done = json.loads((out / DONE_FILE).read_text())
    assert TrainResult.from_dict(done["result"]) == result
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["config"]["loss_weights"] == WEIGHTS and "torch" in manifest["versions"]
    assert not list(out.glob(".adapter*"))  # no partial final output left behind
    # LoRA leaves the vision encoder frozen: each of the 8 images is encoded in epoch 1 only.
    assert result.encoder_cache["encoded"] == 8 and result.encoder_cache["reused"] == 8


def test_lora_touches_only_the_language_model(lora_run, tiny_qwen, tiny_llava):
    result, _ = lora_run
    saved = adapter_weights(result)
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # it trained

    for path in (tiny_qwen, tiny_llava):  # LLaVA's CLIP tower has q_proj/k_proj/v_proj too
        model = prepare_model(load_model(path).model, TrainConfig())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
        assert not any(VISION_TOWER_PATTERN.search(n) for n in trainable)

    full = prepare_model(load_model(tiny_qwen).model, TrainConfig(lora=False))
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.visual.") and ".merger." not in n for n in frozen)
    assert full.get_parameter("model.visual.merger.ln_q.weight").requires_grad


def test_trained_adapter_loads_and_generates(lora_run, tiny_qwen, data):
    result, _ = lora_run
    items, examples = data
    example = examples[items[1].example_id]
    request = Request.user(items[1].prompt, example.load_images())
    adapted = HFBackend(model=tiny_qwen, adapter=result.output_path)
    completion = adapted.generate([request], Sampling.greedy_decoding(max_new_tokens=8))[0][0]
    assert completion.completion_tokens >= 1 and completion.finish_reason in {"stop", "length"}
    base = load_model(tiny_qwen)
    inputs = base.processor(text=[adapted.prompt_text(request)], images=request.images, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(base.model(**inputs).logits, adapted.loaded.model(**inputs).logits)


class Interrupt(Exception):
    pass


class KillAfterSave(TrainerCallback):
    """Stands in for a kill right after the epoch-1 checkpoint is on disk."""

    def on_save(self, args, state, control, **kwargs):
        raise Interrupt(f"killed after saving step {state.global_step}")


def test_resume_after_a_kill_gives_the_uninterrupted_weights(lora_run, tiny_qwen, data, tmp_path):
    straight, _ = lora_run
    items, examples = data
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        train(tiny_qwen, items, examples, lora_config(), out, callbacks=[KillAfterSave()])
    assert not (out / DONE_FILE).exists() and not (out / "adapter").exists()
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists()
    torn = out / "checkpoints" / "checkpoint-2"  # as if a later kill cut a save short
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half a file")

    resumed = train(tiny_qwen, items, examples, lora_config(), out)
    assert resumed.resumed_from.endswith("checkpoint-1") and resumed.steps == 2
    assert [r["step"] for r in read_log(out)] == [1, 2]
    expected, got = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)

    # A one-epoch run, then the same run asked for two epochs, continues from its checkpoint.
    extended = tmp_path / "extended"
    one = train(tiny_qwen, items, examples, lora_config(epochs=1), extended)
    assert one.steps == 1
    two = train(tiny_qwen, items, examples, lora_config(epochs=2), extended)
    assert two.resumed_from.endswith("checkpoint-1") and two.steps == 2
    assert all(torch.allclose(expected[k], adapter_weights(two)[k], atol=1e-6) for k in expected)

    # A finished run is not trained again; other items in the same folder are refused.
    log_before = (out / LOG_FILE).read_text()
    assert train(tiny_qwen, items, examples, lora_config(), out) == resumed
    assert (out / LOG_FILE).read_text() == log_before
    with pytest.raises(ValueError, match="checkpoints of a different run"):
        train(tiny_qwen, items[:4], examples, lora_config(), out)


def test_full_fine_tuning_resumes_from_its_checkpoint_weights(tiny_qwen, data, tmp_path):
    """Full fine-tuning saves under the hub's key names (Qwen2-VL's differ from the model's own):
    the resumed run must start from the checkpoint's weights, not from the base."""
    items, examples = data
    config = lora_config(lora=False)
    straight = train(tiny_qwen, items, examples, config, tmp_path / "straight")
    killed = tmp_path / "killed"
    with pytest.raises(Interrupt):
        train(tiny_qwen, items, examples, config, killed, callbacks=[KillAfterSave()])
    resumed = train(tiny_qwen, items, examples, config, killed)
    assert resumed.resumed_from.endswith("checkpoint-1") and resumed.steps == straight.steps == 2
    expected = load_file(Path(straight.output_path) / "model.safetensors")
    got = load_file(Path(resumed.output_path) / "model.safetensors")
    assert expected.keys() == got.keys()
    base = load_file(Path(tiny_qwen) / "model.safetensors")
    assert any(not torch.equal(expected[k], base[k]) for k in expected if k in base)  # training moved the weights
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)


class PoisonWeight(TrainerCallback):
    """Writes a NaN into one trainable weight at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            weight = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.view(-1)[0] = float("nan")


@pytest.mark.parametrize(
    ("what", "poison_step", "caught_at", "kept", "logged"),
    [
        # 4 items, 2 per step: two steps per epoch; NaN weights after step 3 give a NaN loss in step 4.
        ("loss", 3, 4, "checkpoint-2", [1, 2, 3]),
        # 8 items in one step per epoch: NaN weights after step 1 would be the epoch's checkpoint.
        ("weight", 1, 1, None, [1]),
    ],
)
def test_nonfinite_values_stop_training_and_keep_the_last_good_checkpoint(
    what, poison_step, caught_at, kept, logged, tiny_qwen, data, tmp_path
):
    items, examples = data
    if what == "loss":
        items, config = items[:4], lora_config(batch_size=2, global_batch=2)
    else:
        config = lora_config()
    with pytest.raises(NonFiniteLossError, match=f"non-finite {what} at optimizer step {caught_at}") as error:
        train(tiny_qwen, items, examples, config, tmp_path, callbacks=[PoisonWeight(poison_step)])
    assert error.value.step == caught_at
    assert not (tmp_path / DONE_FILE).exists() and not (tmp_path / "adapter").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    if kept is None:  # the poisoned weights were never written
        assert checkpoints == [] and error.value.last_checkpoint is None
    else:
        assert checkpoints == [kept] and error.value.last_checkpoint.endswith(kept)
        saved = load_file(str(tmp_path / "checkpoints" / kept / "adapter_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert f"last good checkpoint: {error.value.last_checkpoint}" in str(error.value)
    assert [r["step"] for r in read_log(tmp_path)] == logged


def test_full_fine_tuning_lowers_the_loss_and_saves_a_loadable_model(tiny_qwen, data, tmp_path):
    items, examples = data
    config = replace(tiny_preset(), epochs=4, batch_size=4, global_batch=4, logging_steps=4, freeze_vision_tower=False,
                     freeze_projector=False)
    result = train(tiny_qwen, items, examples, config, tmp_path)
    assert not result.is_adapter and result.steps == 8
    assert result.encoder_cache is None  # the encoder trains: its outputs change every step
    assert (tmp_path / "model" / "model.safetensors").exists()

    def mean_loss(path: str) -> float:
        lm = load_model(path)
        dataset = ItemDataset(lm.processor, items, examples, max_length=2048)
        batch = CompletionCollator(lm.processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        batch.pop("objective")
        with torch.no_grad():
            return float(lm.model(**batch).loss)

    before, after = mean_loss(tiny_qwen), mean_loss(result.output_path)
    assert after < 0.8 * before
    log = read_log(tmp_path)
    assert log[-1]["loss"] < log[0]["loss"]


def test_config_presets_and_validation():
    qwen2 = reference_preset("qwen2-vl")
    assert (qwen2.lora, qwen2.lora_r, qwen2.lora_alpha, qwen2.global_batch) == (True, 8, 16, 64)
    assert (qwen2.learning_rate, qwen2.epochs, qwen2.adam_beta2, qwen2.max_length) == (3e-5, 3, 0.98, 2048)
    assert (reference_preset("llava").lora_r, reference_preset("LLaVA-1.5").lora_alpha) == (128, 256)
    qwen_vl = reference_preset("qwen-vl")
    assert (qwen_vl.lora_r, qwen_vl.lora_alpha) == (64, 16) and "c_attn" in qwen_vl.lora_target
    assert preset_for_model("tiny-qwen2-vl") == tiny_preset()
    # the built-in base model, by name or as a folder that build_base_model wrote (a rebuild)
    from r3v.models.loading import resolve_model

    assert preset_for_model("r3v-clevr-base") == preset_for_model(resolve_model("r3v-clevr-base")) == tiny_preset()
    assert TrainConfig.from_dict(qwen2.to_dict()) == qwen2
    with pytest.raises(ValueError, match="unknown model family"):
        reference_preset("gpt-2")
    with pytest.raises(ValueError, match="unknown objective"):
        TrainConfig(loss_weights={"dpo": 1.0})
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"lr": 1.0})
    assert TrainConfig(loss_weights={"refine": 0.5}).loss_weights == {"sft": 1.0, "refine": 0.5, "select": 1.0}


@pytest.mark.parametrize("name", ["tiny_qwen", "tiny_llava"])
def test_the_tiny_preset_freezes_the_image_path_and_trains_the_language_model(name, request):
    from r3v.models.families import image_path_parameters
    from r3v.models.shared_images import encoder_is_frozen

    model = prepare_model(load_model(request.getfixturevalue(name)).model, tiny_preset())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    image_path = {n for n, _ in image_path_parameters(model)}
    assert trainable and image_path and not image_path & set(trainable)
    assert any("language_model" in n for n in trainable) and encoder_is_frozen(model)
    # Only the tower frozen: the projector / merger trains.
    model = prepare_model(load_model(request.getfixturevalue(name)).model, replace(tiny_preset(), freeze_projector=False))
    projector = [n for n, p in image_path_parameters(model) if p.requires_grad]
    assert projector and all(("merger" in n) or ("multi_modal_projector" in n) for n in projector)


class _Capture(TrainerCallback):
    """Keeps weak references to what the Trainer trains with, and what each attempt looked like."""

    def __init__(self) -> None:
        self.refs: list = []
        self.attempts: list[tuple[int, int, bool]] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import weakref

        self.refs += [weakref.ref(model), weakref.ref(next(model.parameters()))]
        self.attempts.append((args.per_device_train_batch_size, args.gradient_accumulation_steps,
                              bool(getattr(model, "is_activation_checkpointing", False))))


def test_nothing_train_built_is_alive_after_it_returns(tiny_qwen, data, tmp_path):
    """The Trainer holds itself through its step callback; train() breaks that, so the model and its
    parameters are gone as soon as the caller's references are."""
    import gc

    items, examples = data
    capture = _Capture()
    train(tiny_qwen, items, examples, lora_config(epochs=1), tmp_path, callbacks=[capture])
    gc.collect()
    assert capture.refs and all(ref() is None for ref in capture.refs)


class _OutOfMemoryAbove(TrainerCallback):
    """Raises the error CUDA raises when a micro-batch is larger than ``limit`` (fault injection)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def on_step_begin(self, args, state, control, **kwargs):
        if args.per_device_train_batch_size > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


def test_auto_batch_size_halves_the_micro_batch_and_keeps_the_global_batch(tiny_qwen, data, tmp_path):
    items, examples = data
    capture = _Capture()
    config = lora_config(batch_size=8, global_batch=8, auto_batch_size=True)
    result = train(tiny_qwen, items, examples, config, tmp_path / "auto", callbacks=[_OutOfMemoryAbove(2), capture])
    assert [a[:2] for a in capture.attempts] == [(8, 1), (4, 2), (2, 4)]
    assert result.batch == {"processes": 1, "per_device": 2, "accumulation": 4, "step_items": 8,
                            "gradient_checkpointing": False}
    # the same steps as a run told to use 2 items per device from the start
    direct = train(tiny_qwen, items, examples, lora_config(batch_size=2, global_batch=8), tmp_path / "direct")
    ours, theirs = adapter_weights(result), adapter_weights(direct)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-6
    assert read_log(tmp_path / "auto") == read_log(tmp_path / "direct")
    # without the flag the error reaches the caller
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_qwen, items, examples, lora_config(batch_size=8, global_batch=8), tmp_path / "plain",
              callbacks=[_OutOfMemoryAbove(2)])


def test_gradient_checkpointing_follows_the_model_size_unless_set(tiny_qwen, data, tmp_path, monkeypatch):
    import r3v.train.trainer as training

    items, examples = data
    runs = {}
    for name, setting, threshold in (("auto-small", None, 10**9), ("auto-large", None, 0), ("off", False, 0)):
        monkeypatch.setattr(training, "CHECKPOINTING_ABOVE", threshold)
        capture = _Capture()
        runs[name] = train(tiny_qwen, items, examples, lora_config(epochs=1, gradient_checkpointing=setting),
                           tmp_path / name, callbacks=[capture])
        assert capture.attempts[0][2] == runs[name].batch["gradient_checkpointing"]
    assert [runs[n].batch["gradient_checkpointing"] for n in ("auto-small", "auto-large", "off")] == [False, True, False]
    # recomputing activations changes no number
    assert runs["auto-large"].losses == pytest.approx(runs["off"].losses, rel=1e-5)


def test_batch_plan_gives_the_global_batch_for_any_process_count():
    from r3v.train import plan_batch

    reference = reference_preset("qwen2-vl")
    assert [plan_batch(reference, n) for n in (1, 2, 8)] == [(2, 32, 64), (2, 16, 64), (2, 4, 64)]
    assert plan_batch(replace(reference, batch_size=3), 1) == (2, 32, 64)  # a divisor of the step
    assert plan_batch(tiny_preset(), 2) == (8, 1, 16)
    assert plan_batch(replace(reference, global_batch=None, batch_size=4, grad_accum=3), 2) == (4, 3, 24)
    with pytest.raises(ValueError, match="not a multiple of the 3 training processes"):
        plan_batch(reference, 3)


def test_every_train_config_field_is_documented():
    """docs/training.md lists every TrainConfig field, so a new setting cannot go undocumented."""
    import dataclasses

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in text]
    assert not missing, f"document these TrainConfig fields in docs/training.md: {missing}"


def test_a_global_batch_larger_than_the_data_pads_nothing(tiny_qwen, data, tmp_path, monkeypatch):
    """8 items with R3V's global batch of 64: one step of the 8 items, no label-free copies computed
    (the short last step is padded only to a whole micro-batch per process), and the same update as
    a global batch of 8."""
    import r3v.train.trainer as training

    rows = []

    class CountingCollator(training.CompletionCollator):
        def __call__(self, features):
            rows.extend(bool(f.get("padding", False)) for f in features)
            return super().__call__(features)

    monkeypatch.setattr(training, "CompletionCollator", CountingCollator)
    items, examples = data
    big = train(tiny_qwen, items, examples, lora_config(epochs=1, batch_size=2, global_batch=64), tmp_path / "big")
    assert big.steps == 1 and big.batch["accumulation"] == 32 and rows == [False] * 8
    rows.clear()
    exact = train(tiny_qwen, items, examples, lora_config(epochs=1, batch_size=2, global_batch=8), tmp_path / "exact")
    assert rows == [False] * 8
    ours, theirs = adapter_weights(big), adapter_weights(exact)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-6
