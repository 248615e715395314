"""The HF backend's shared prefill: one prefill per question, N completions from a repeated cache.

Checked against plain ``model.generate`` (greedy) and against uncached forward passes over the
prompt plus the sampled completion (teacher forcing), on tiny real Qwen2-VL (M-RoPE) and LLaVA.
"""

from __future__ import annotations

import pytest
import torch

from r3v.backends.hf import HFBackend, decode, prefill, row_seed, supports_shared_prefill
from r3v.models.batching import collate, encode
from r3v.records import Request, Sampling

# Every token of the vocabulary is a candidate, so samples are varied even on a random model.
WIDE = Sampling(n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, seed=3)


@pytest.fixture(scope="module")
def requests_three(clevr_task) -> list[Request]:
    examples = clevr_task.load("test", limit=3)
    return [Request.user(clevr_task.cot_prompt(e), e.load_images()) for e in examples]


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-llava"])
def backend(request, r3v_cache) -> HFBackend:
    return HFBackend(model=request.param)


def encoded_batch(backend: HFBackend, requests: list[Request]) -> tuple[list[dict], dict]:
    encoded = [encode(backend.processor, backend.prompt_text(r), r.images) for r in requests]
    return encoded, collate(encoded, backend.tokenizer.pad_token_id, padding_side="left")


def run_decode(backend: HFBackend, requests: list[Request], sampling: Sampling, stop_ids=None, **options):
    _, batch = encoded_batch(backend, requests)
    n = 1 if sampling.greedy else sampling.n
    seeds = [row_seed(sampling.seed, i, k) for i in range(len(requests)) for k in range(n)]
    stops = set(backend._stop_ids()) if stop_ids is None else stop_ids
    with torch.inference_mode():
        state = prefill(backend.loaded.model, batch)
        state.repeat(n)
        return decode(backend.loaded.model, state, sampling, seeds, stops, backend.tokenizer.pad_token_id, **options)


def plain_generate_greedy(backend: HFBackend, requests: list[Request], max_new_tokens: int) -> list[list[int]]:
    """The reference: HF generate on the same left-padded batch, cut after the first stop token."""
    _, batch = encoded_batch(backend, requests)
    with torch.inference_mode():
        output = backend.loaded.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=backend.tokenizer.pad_token_id,
            eos_token_id=backend._stop_ids(),
        )
    stops = set(backend._stop_ids())
    rows = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_equals_plain_generate(backend, requests_three):
    expected = plain_generate_greedy(backend, requests_three, max_new_tokens=10)
    decoded = run_decode(backend, requests_three, Sampling.greedy_decoding(max_new_tokens=10))
    assert decoded.tokens == expected
    completions = backend.generate(requests_three, Sampling.greedy_decoding(max_new_tokens=10))
    texts = [backend.tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert [c[0].text for c in completions] == texts
    assert [c[0].completion_tokens for c in completions] == [len(ids) for ids in expected]


def test_repeated_cache_continues_at_the_right_positions(backend, requests_three):
    """Each sampled token's logits equal those of one uncached forward pass over prompt + completion.

    This is the check on the cache repeat and, for Qwen2-VL, on the M-RoPE position state: the
    uncached pass recomputes the 3D positions from scratch.
    """
    decoded = run_decode(backend, requests_three, WIDE, keep_logits=True)
    encoded, _ = encoded_batch(backend, requests_three)
    assert len({tuple(t) for t in decoded.tokens}) > 1  # samples differ, so the check is not vacuous
    for slot, (tokens, step_logits) in enumerate(zip(decoded.tokens, decoded.logits, strict=True)):
        prompt = encoded[slot // WIDE.n]
        full = teacher_forced_logits(backend, prompt, tokens)
        prompt_length = prompt["input_ids"].shape[0]
        for step, logits in enumerate(step_logits):
            torch.testing.assert_close(logits, full[prompt_length - 1 + step], atol=2e-4, rtol=1e-4)


def teacher_forced_logits(backend: HFBackend, prompt: dict, completion: list[int]) -> torch.Tensor:
    ids = torch.tensor(completion, dtype=torch.long)
    feature = dict(prompt)
    feature["input_ids"] = torch.cat([prompt["input_ids"], ids])
    feature["attention_mask"] = torch.ones_like(feature["input_ids"])
    if "mm_token_type_ids" in feature:
        feature["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)])
    batch = collate([feature], backend.tokenizer.pad_token_id, padding_side="left")
    with torch.inference_mode():
        return backend.loaded.model(**batch).logits[0].float()


def test_top_k_one_sampling_from_the_repeated_cache_is_greedy(backend, requests_three):
    expected = plain_generate_greedy(backend, requests_three, max_new_tokens=8)
    sampled = run_decode(backend, requests_three, Sampling(n=2, top_k=1, max_new_tokens=8, seed=9))
    assert sampled.tokens == [ids for ids in expected for _ in range(2)]


def test_seeded_sampling_is_deterministic_and_batch_independent(backend, requests_three):
    first = backend.generate(requests_three, WIDE)
    assert backend.generate(requests_three, WIDE) == first
    other_seed = backend.generate(requests_three, Sampling(**{**WIDE.to_dict(), "seed": WIDE.seed + 1}))
    assert [c.text for cs in other_seed for c in cs] != [c.text for cs in first for c in cs]
    # A request's samples come from its own random streams: alone in a batch or not, same draws.
    budget = backend.token_budget
    try:
        backend.token_budget = 1
        alone = backend.generate(requests_three, WIDE)
    finally:
        backend.token_budget = budget
    assert alone == first
    # The n samples of one request are not copies of each other.
    assert any(len({c.text for c in cs}) > 1 for cs in first)


def test_n_completions_and_token_counts(backend, requests_three):
    out = backend.generate(requests_three, WIDE)
    assert [len(cs) for cs in out] == [WIDE.n] * len(requests_three)
    for request, completions in zip(requests_three, out, strict=True):
        prompt = backend.processor(text=[backend.prompt_text(request)], images=request.images)
        for completion in completions:
            assert completion.prompt_tokens == len(prompt["input_ids"][0])
            assert 1 <= completion.completion_tokens <= WIDE.max_new_tokens
            if completion.finish_reason == "length":
                assert completion.completion_tokens == WIDE.max_new_tokens
            else:
                assert completion.finish_reason == "stop"


def test_stopping_rows_are_cut_and_dropped_without_changing_the_others(backend, requests_three):
    """Stop on a token some sampled rows emit: those rows end there with 'stop' and leave the
    batch at once (compact_fraction=0); the others keep exactly the tokens they had without it."""
    free = run_decode(backend, requests_three, WIDE, stop_ids=set())
    assert all(len(t) == WIDE.max_new_tokens for t in free.tokens) and set(free.finish) == {"length"}
    rows = len(free.tokens)
    holders = {t: sum(t in row for row in free.tokens) for row in free.tokens for t in row}
    stop = max((t for t, count in holders.items() if count < rows), key=lambda t: (holders[t], -t))
    assert holders[stop] >= 1
    cut = run_decode(backend, requests_three, WIDE, stop_ids={stop}, compact_fraction=0)
    for tokens, reason, reference in zip(cut.tokens, cut.finish, free.tokens, strict=True):
        if stop in reference:
            end = reference.index(stop) + 1
            assert (tokens, reason) == (reference[:end], "stop")
        else:
            assert (tokens, reason) == (reference, "length")
    assert "length" in cut.finish and "stop" in cut.finish


def test_greedy_output_does_not_depend_on_the_token_budget(backend, requests_three):
    greedy = Sampling.greedy_decoding(max_new_tokens=8)
    budget = backend.token_budget
    try:
        backend.token_budget = 1_000_000
        together = backend.generate(requests_three, greedy)
        backend.token_budget = 1
        alone = backend.generate(requests_three, greedy)
    finally:
        backend.token_budget = budget
    assert together == alone


def test_generate_fallback_agrees_with_the_shared_prefill(backend, requests_three):
    """Models the loop cannot mirror go through generate; on these models both paths exist."""
    assert supports_shared_prefill(backend.loaded.model) and backend.shared_prefill
    plain = HFBackend(model=backend.model_id, loaded=backend.loaded, shared_prefill=False)
    greedy = Sampling.greedy_decoding(max_new_tokens=8)
    assert plain.generate(requests_three, greedy) == backend.generate(requests_three, greedy)
    sampled = plain.generate(requests_three, WIDE)
    assert [len(cs) for cs in sampled] == [WIDE.n] * len(requests_three)
    assert plain.generate(requests_three, WIDE) == sampled
    for completion in (c for cs in sampled for c in cs):
        assert 1 <= completion.completion_tokens <= WIDE.max_new_tokens
        if completion.finish_reason == "length":
            assert completion.completion_tokens == WIDE.max_new_tokens
