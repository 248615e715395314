"""The HF backend on real tiny models: n completions, seeded determinism, batch-size invariance."""

import pytest

from r3v.backends.hf import HFBackend
from r3v.records import Request, Sampling


@pytest.fixture(scope="module")
def requests_four(clevr_task):
    examples = clevr_task.load("test", limit=4)
    return [Request.user(clevr_task.cot_prompt(e), e.load_images()) for e in examples]


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-llava"])
def backend(request, r3v_cache):
    return HFBackend(model=request.param)


def test_n_completions_with_token_counts(backend, requests_four):
    out = backend.generate(requests_four, Sampling(n=3, max_new_tokens=8, seed=1))
    assert [len(c) for c in out] == [3, 3, 3, 3]
    for completions in out:
        for completion in completions:
            assert 1 <= completion.completion_tokens <= 8
            assert completion.prompt_tokens > 16  # the image alone is 16 tokens
            assert completion.finish_reason in {"stop", "length"}


def test_same_seed_same_completions_other_seed_differs(backend, requests_four):
    sampling = Sampling(n=2, max_new_tokens=10, seed=5)
    first = backend.generate(requests_four, sampling)
    assert backend.generate(requests_four, sampling) == first
    other = backend.generate(requests_four, Sampling(n=2, max_new_tokens=10, seed=6))
    assert [c.text for cs in other for c in cs] != [c.text for cs in first for c in cs]


