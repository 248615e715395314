"""``repetition_penalty`` from the model's generation config (Qwen2-VL-Instruct ships 1.05): the
shared-prefill decoder applies it exactly as ``model.generate`` does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from r3v.backends.hf import HFBackend
from r3v.models.batching import collate, encode
from r3v.records import Request, Sampling

PENALTY = 1.6  # large, so that the tiny model's greedy text changes with it


@pytest.fixture(scope="module")
def penalised_model(tmp_path_factory):
    """A copy of the demo's base model (it writes real rationales, with repeated words) whose
    generation config asks for a repetition penalty."""
    from r3v.models.loading import resolve_model

    folder = tmp_path_factory.mktemp("penalised") / "model"
    shutil.copytree(resolve_model("r3v-clevr-base"), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": PENALTY}))
    return str(folder)


def requests(clevr_task) -> list[Request]:
    return [Request.user(clevr_task.cot_prompt(ex), ex.load_images()) for ex in clevr_task.load("test", limit=3)]


def test_greedy_decoding_applies_the_generation_configs_penalty_as_generate_does(penalised_model, clevr_task):
    backend = HFBackend(model=penalised_model)
    assert backend.shared_prefill and backend.repetition_penalty == PENALTY
    asked = requests(clevr_task)
    greedy = Sampling.greedy_decoding(max_new_tokens=24)
    ours = [c[0].text for c in backend.generate(asked, greedy)]
    model, processor = backend.loaded.model, backend.processor
    for request, text in zip(asked, ours, strict=True):
        batch = collate([encode(processor, backend.prompt_text(request), request.images)],
                        processor.tokenizer.pad_token_id, padding_side="left")
        with torch.inference_mode():  # generate reads repetition_penalty from the generation config
            output = model.generate(**batch, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, eos_token_id=backend._stop_ids())
        reference = processor.tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == reference
    # not vacuous: without the penalty the same model writes other text
    plain = [c[0].text for c in backend.generate(asked, Sampling.greedy_decoding(max_new_tokens=24,
                                                                                 repetition_penalty=1.0))]
    assert plain != ours


def test_the_drawn_from_logits_are_generates_processed_scores(penalised_model, clevr_task):
    from r3v.backends.hf import decode, prefill

    backend = HFBackend(model=penalised_model)
    request = requests(clevr_task)[0]
    batch = collate([encode(backend.processor, backend.prompt_text(request), request.images)],
                    backend.processor.tokenizer.pad_token_id, padding_side="left")
    sampling = Sampling.greedy_decoding(max_new_tokens=12, repetition_penalty=PENALTY)
    with torch.inference_mode():
        state = prefill(backend.loaded.model, dict(batch))
        decoded = decode(backend.loaded.model, state, sampling, [0], set(backend._stop_ids()),
                         backend.processor.tokenizer.pad_token_id, keep_logits=True)
        output = backend.loaded.model.generate(**batch, max_new_tokens=12, do_sample=False, temperature=None,
                                               top_p=None, top_k=None, eos_token_id=backend._stop_ids(),
                                               output_scores=True, return_dict_in_generate=True)
    assert len(decoded.logits[0]) == len(output.scores)
    for ours, theirs in zip(decoded.logits[0], output.scores, strict=True):
        torch.testing.assert_close(ours, theirs[0].float(), rtol=1e-4, atol=1e-4)


def test_an_explicit_penalty_wins_over_the_generation_config(penalised_model, clevr_task):
    backend = HFBackend(model=penalised_model)
    asked = requests(clevr_task)[:1]
    unset = backend.generate(asked, Sampling(n=2, max_new_tokens=10, seed=3))
    explicit = backend.generate(asked, Sampling(n=2, max_new_tokens=10, seed=3, repetition_penalty=PENALTY))
    off = backend.generate(asked, Sampling(n=2, max_new_tokens=10, seed=3, repetition_penalty=1.0))
    assert unset == explicit and off != unset
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampling(repetition_penalty=0)
