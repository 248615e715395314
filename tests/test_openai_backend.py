"""The openai backend against a real HTTP server on loopback (tests/chat_server.py).

The server either runs the tiny Qwen2-VL through the HF backend (real generations, images
decoded back from the data URLs), or answers from a script; a fault plan injects 429s, 5xx,
slow replies and malformed bodies.
"""

from __future__ import annotations

import threading
import time

import pytest
from chat_server import ChatServer, Fault, ModelAnswerer, ScriptedAnswerer, word_count

from r3v.backends.openai import BackendError, OpenAIBackend, request_seed, split_proportionally
from r3v.records import Request, Sample, Sampling, read_jsonl
from r3v.registry import backends
from r3v.store import SampleStore, sample_examples


@pytest.fixture(scope="module")
def examples(clevr_task):
    return clevr_task.load("test", limit=3)


@pytest.fixture(scope="module")
def requests_three(clevr_task, examples):
    return [Request.user(clevr_task.cot_prompt(e), e.load_images()) for e in examples]


def echo(call, n):
    """Distinct, deterministic texts: they name the call's seed and the choice."""
    return [f"seed {call.payload.get('seed')} choice {k} Answer: {k}" for k in range(n)]


def client(server: ChatServer, **options) -> OpenAIBackend:
    options = {"backoff_base_s": 0.01, "max_concurrency": 1, **options}
    return OpenAIBackend(model="teacher", base_url=server.base_url, **options)


# --- real generations through HTTP -------------------------------------------------------------


def test_greedy_over_http_equals_the_hf_backend(qwen_backend, requests_three):
    greedy = Sampling.greedy_decoding(max_new_tokens=12)
    with ChatServer(ModelAnswerer(qwen_backend)) as server:
        backend = client(server, max_concurrency=3)
        remote = backend.generate(requests_three, greedy)
    local = qwen_backend.generate(requests_three, greedy)
    assert remote == local  # text, prompt and completion tokens, finish reason
    # The server saw exactly what the caller sent: same text, same pixels (PNG is lossless).
    def seen(prompt, images):
        return prompt, tuple(im.tobytes() for im in images)

    assert sorted(seen(c.prompt, c.images) for c in server.calls) == sorted(
        seen(r.text, r.images) for r in requests_three
    )
    assert all(c.payload["temperature"] == 0.0 and c.payload["max_tokens"] == 12 for c in server.calls)
    assert backend.usage.requests == 3
    assert backend.usage.prompt_tokens == sum(c[0].prompt_tokens for c in local)
    assert backend.usage.completion_tokens == sum(c[0].completion_tokens for c in local)


def test_sampling_settings_and_seed_reach_the_model(qwen_backend, requests_three):
    sampling = Sampling(n=3, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=8, seed=4)
    with ChatServer(ModelAnswerer(qwen_backend)) as server:
        backend = client(server, send_top_k=True, max_concurrency=2)
        first = backend.generate(requests_three, sampling)
        again = backend.generate(requests_three, sampling)
    assert first == again
    assert [len(c) for c in first] == [3, 3, 3]
    for call in server.calls:
        assert (call.payload["n"], call.payload["top_k"], call.payload["top_p"]) == (3, 50, 0.95)
    # Request i carries the seed derived from (seed, i); the model with that seed gives the same texts.
    for i, request in enumerate(requests_three):
        direct = qwen_backend.generate([request], Sampling(**{**sampling.to_dict(), "seed": request_seed(4, i, 0)}))
        assert [c.text for c in first[i]] == [c.text for c in direct[0]]
        assert sum(c.completion_tokens for c in first[i]) == sum(c.completion_tokens for c in direct[0])


def test_top_k_is_not_sent_by_default(requests_three):
    with ChatServer(ScriptedAnswerer(echo)) as server:
        client(server).generate(requests_three[:1], Sampling(n=1, seed=0))
    assert "top_k" not in server.calls[0].payload
    assert server.calls[0].payload["seed"] == request_seed(0, 0, 0)


def test_registered_and_built_through_the_registry(requests_three):
    with ChatServer(ScriptedAnswerer(echo)) as server:
        backend = backends.get("openai")(
            model="teacher", adapter=None, trust_remote_code=False, base_url=server.base_url
        )
        out = backend.generate(requests_three[:1], Sampling(n=2, seed=1))
    assert backend.model_id == "teacher" and server.calls[0].payload["model"] == "teacher"
    assert [c.text for c in out[0]] == echo(server.calls[0], 2)


# --- n, tokens, concurrency ---------------------------------------------------------------------


def test_server_that_ignores_n_is_topped_up_with_more_requests(requests_three):
    with ChatServer(ScriptedAnswerer(echo), max_choices=1) as server:
        out = client(server).generate(requests_three[:2], Sampling(n=3, seed=7))
    assert [len(c) for c in out] == [3, 3]
    assert [c.payload["n"] for c in server.calls] == [3, 2, 1, 3, 2, 1]  # one at a time: concurrency 1
    seeds = [c.payload["seed"] for c in server.calls]
    assert seeds == [request_seed(7, i, r) for i in range(2) for r in range(3)]
    assert [c.text for c in out[0]] == [echo(call, 1)[0] for call in server.calls[:3]]


def test_max_n_splits_a_request(requests_three):
    with ChatServer(ScriptedAnswerer(echo)) as server:
        out = client(server, max_n=2).generate(requests_three[:1], Sampling(n=5, seed=0))
    assert len(out[0]) == 5
    assert [c.payload["n"] for c in server.calls] == [2, 2, 1]


def test_token_usage_is_summed_and_shared_between_choices(requests_three):
    def uneven(call, n):
        return ["short Answer: 1", "a much longer rationale with many more words in it Answer: 2"][:n]

    with ChatServer(ScriptedAnswerer(uneven)) as server:
        backend = client(server, max_concurrency=3)
        out = backend.generate(requests_three, Sampling(n=2, seed=0))
    expected_completion = 3 * sum(word_count(t) for t in uneven(None, 2))
    assert backend.usage.completion_tokens == expected_completion
    assert backend.usage.prompt_tokens == sum(word_count(r.text) for r in requests_three)
    for request, completions in zip(requests_three, out, strict=True):
        assert all(c.prompt_tokens == word_count(request.text) for c in completions)
        assert sum(c.completion_tokens for c in completions) == sum(word_count(t) for t in uneven(None, 2))
        assert completions[0].completion_tokens < completions[1].completion_tokens


def test_split_proportionally_sums_to_the_total():
    for total, weights in [(10, [1, 1, 1]), (7, [0, 0]), (0, [3, 4]), (101, [5, 17, 2, 9]), (3, [])]:
        shares = split_proportionally(total, weights)
        assert len(shares) == len(weights)
        assert sum(shares) == (total if weights else 0)
        assert all(s >= 0 for s in shares)


def test_requests_in_flight_stay_within_max_concurrency(clevr_task):
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()
    full = threading.Event()  # set once 3 requests are in flight together

    def slow_echo(call, n):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            if state["now"] == 3:
                full.set()
        full.wait(timeout=5)  # hold the first replies until the bound is reached, however slow the machine
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return echo(call, n)

    requests = [Request.user(f"question {i}") for i in range(8)]
    with ChatServer(ScriptedAnswerer(slow_echo)) as server:
        out = client(server, max_concurrency=3).generate(requests, Sampling(n=1, seed=0))
    assert state["peak"] == 3  # parallel, but never above the bound
    # Results come back in request order whatever order the replies arrived in.
    prompts = {c.prompt: c for c in server.calls}
    assert [o[0].text for o in out] == [echo(prompts[r.text], 1)[0] for r in requests]


# --- failures -----------------------------------------------------------------------------------


def test_429_honours_retry_after(requests_three):
    faults = {1: Fault("status", status=429, message="rate limited", retry_after="0.3")}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        backend = client(server)
        started = time.perf_counter()
        out = backend.generate(requests_three[:1], Sampling(n=1, seed=0))
        elapsed = time.perf_counter() - started
    assert out[0][0].text == echo(server.calls[1], 1)[0]
    assert backend.retry_log == [("HTTP 429", 0.3)]
    assert elapsed >= 0.3
    assert (backend.usage.attempts, backend.usage.retries, backend.usage.requests) == (2, 1, 1)


def test_5xx_backs_off_exponentially_with_seeded_jitter(requests_three):
    faults = {1: Fault("status", 500), 2: Fault("status", 503), 3: Fault("status", 502)}
    logs = []
    for retry_seed in (3, 3, 4):
        with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
            backend = client(server, backoff_base_s=0.02, retry_seed=retry_seed)
            out = backend.generate(requests_three[:1], Sampling(n=1, seed=0))
        assert len(server.calls) == 4 and len(out[0]) == 1
        logs.append(backend.retry_log)
    assert [kind for kind, _ in logs[0]] == ["HTTP 500", "HTTP 503", "HTTP 502"]
    for k, (_, delay) in enumerate(logs[0]):
        assert 0.02 * 2**k / 2 <= delay <= 0.02 * 2**k  # equal jitter: [half, full] of the doubled delay
    assert logs[0] == logs[1]  # same seed, same waits
    assert logs[0] != logs[2]


def test_backoff_is_capped(requests_three):
    faults = {i: Fault("status", 500) for i in (1, 2, 3)}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        backend = client(server, backoff_base_s=0.01, backoff_max_s=0.015)
        backend.generate(requests_three[:1], Sampling(n=1, seed=0))
    assert all(delay <= 0.015 for _, delay in backend.retry_log)


def test_gives_up_after_max_retries_with_the_last_error(requests_three):
    faults = {i: Fault("status", 503, message="model is overloaded") for i in (1, 2, 3)}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match="gave up after 3 attempts.*HTTP 503: model is overloaded") as error:
            client(server, max_retries=2).generate(requests_three[:1], Sampling(n=1, seed=0))
    assert error.value.status == 503
    assert len(server.calls) == 3


def test_client_error_fails_fast_with_the_servers_message(requests_three):
    faults = {1: Fault("status", 400, message="This model's maximum context length is 128 tokens")}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match="HTTP 400: This model's maximum context length is 128") as error:
            client(server).generate(requests_three[:1], Sampling(n=1, seed=0))
    assert error.value.status == 400
    assert len(server.calls) == 1  # no retry


def test_exhausted_quota_is_not_retried(requests_three):
    faults = {1: Fault("status", 429, message="You exceeded your current quota", code="insufficient_quota")}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match="HTTP 429: You exceeded your current quota"):
            client(server).generate(requests_three[:1], Sampling(n=1))
    assert len(server.calls) == 1


def test_refused_connection_is_retried_then_reported(requests_three):
    with ChatServer(ScriptedAnswerer(echo)) as server:
        url = server.base_url
    # The server is gone: nothing listens on its port any more.
    backend = OpenAIBackend(model="m", base_url=url, max_retries=2, backoff_base_s=0.01)
    with pytest.raises(BackendError, match="gave up after 3 attempts; last error: connection failed"):
        backend.generate(requests_three[:1], Sampling(n=1))
    assert [kind for kind, _ in backend.retry_log] == ["connection failed"] * 2


def test_api_key_comes_from_the_named_environment_variable(monkeypatch, requests_three):
    with ChatServer(ScriptedAnswerer(echo), api_key="sk-right") as server:
        monkeypatch.setenv("MY_TEACHER_KEY", "sk-wrong")
        with pytest.raises(BackendError, match="HTTP 401: Incorrect API key provided"):
            client(server, api_key_env="MY_TEACHER_KEY").generate(requests_three[:1], Sampling(n=1))
        monkeypatch.setenv("MY_TEACHER_KEY", "sk-right")
        client(server, api_key_env="MY_TEACHER_KEY").generate(requests_three[:1], Sampling(n=1))
    assert [c.authorization for c in server.calls] == ["Bearer sk-wrong", "Bearer sk-right"]


def test_slow_reply_times_out_and_is_retried(requests_three):
    faults = {1: Fault("slow", delay_s=1.5)}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        backend = client(server, timeout_s=0.2)
        started = time.perf_counter()
        out = backend.generate(requests_three[:1], Sampling(n=1, seed=0))
        elapsed = time.perf_counter() - started
    assert [kind for kind, _ in backend.retry_log] == ["timeout"]
    assert out[0][0].text == echo(server.calls[1], 1)[0]
    assert elapsed < 1.5  # it did not wait for the slow reply


def test_timeouts_exhaust_retries_with_a_clear_error(requests_three):
    faults = {i: Fault("slow", delay_s=1.0) for i in (1, 2)}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match="gave up after 2 attempts.*timeout: no reply within 0.2 s"):
            client(server, timeout_s=0.2, max_retries=1).generate(requests_three[:1], Sampling(n=1))


def test_one_malformed_body_is_retried(requests_three):
    with ChatServer(ScriptedAnswerer(echo), faults={1: Fault("not-json")}) as server:
        backend = client(server)
        out = backend.generate(requests_three[:1], Sampling(n=1, seed=0))
    assert [kind for kind, _ in backend.retry_log] == ["malformed response"]
    assert out[0][0].text == echo(server.calls[1], 1)[0]


def test_two_malformed_bodies_in_a_row_fail_with_a_snippet(requests_three):
    faults = {1: Fault("not-json"), 2: Fault("no-choices")}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match=r"no 'choices' in the body: \{\"object\": \"chat.completion\".*twice"):
            client(server).generate(requests_three[:1], Sampling(n=1, seed=0))
    assert len(server.calls) == 2


def test_a_failed_request_stops_the_batch(requests_three):
    faults = {2: Fault("status", 404, message="The model `teacher` does not exist")}
    with ChatServer(ScriptedAnswerer(echo), faults=faults) as server:
        with pytest.raises(BackendError, match="HTTP 404: The model `teacher` does not exist"):
            client(server).generate(requests_three, Sampling(n=1, seed=0))
    assert len(server.calls) == 2  # the third request was never sent


# --- configuration ------------------------------------------------------------------------------


def test_configuration_errors_are_clear(monkeypatch):
    monkeypatch.delenv("R3V_OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="cannot apply an adapter.*--lora-modules"):
        OpenAIBackend(model="m", adapter="runs/adapter", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="unknown openai backend option.*max_concurency"):
        OpenAIBackend(model="m", max_concurency=4)
    with pytest.raises(ValueError, match="needs an API key: set the environment variable OPENAI_API_KEY"):
        OpenAIBackend(model="gpt-4o")
    with pytest.raises(ValueError, match="must start with http"):
        OpenAIBackend(model="m", base_url="localhost:8000/v1")


def test_base_url_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("R3V_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1/")
    assert OpenAIBackend(model="m").endpoint == "http://127.0.0.1:8000/v1/chat/completions"
    monkeypatch.delenv("R3V_OPENAI_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9000/v1")
    assert OpenAIBackend(model="m").base_url == "http://127.0.0.1:9000/v1"
    assert OpenAIBackend(model="m", base_url="http://h:1/v1").base_url == "http://h:1/v1"


# --- resuming through the sample store ----------------------------------------------------------


def test_interrupted_sampling_resumes_without_asking_stored_work_again(clevr_task, tmp_path):
    examples = clevr_task.load("test", limit=6)
    sampling = Sampling(n=2, max_new_tokens=16, seed=3)
    settings = {"backend": "openai", "model": "teacher", "sampling": sampling.to_dict()}

    def run(path, faults=None):
        with ChatServer(ScriptedAnswerer(echo), faults=faults or {}) as server:
            store = SampleStore(path, settings)
            backend = client(server)
            try:
                sample_examples(backend, clevr_task, examples, sampling, store, chunk_size=2)
            except BackendError:
                pass
        return server, store

    # Call 4 (the second request of the second chunk) is refused: chunk 0 is stored, chunk 1 is not.
    first, store = run(tmp_path / "s.jsonl", {4: Fault("status", 400, message="stop")})
    stored_ids = {s.example_id for s in store.samples()}
    assert stored_ids == {examples[0].id, examples[1].id}
    second, store = run(tmp_path / "s.jsonl")
    asked_again = [c.prompt for c in second.calls]
    assert len(asked_again) == len(examples) - len(stored_ids)
    assert asked_again == [clevr_task.cot_prompt(e) for e in examples[2:]]
    clean, clean_store = run(tmp_path / "clean.jsonl")
    assert store.samples() == clean_store.samples()  # equality leaves the measured seconds out


def test_r3v_generate_with_the_openai_backend_resumes(clevr_task, tmp_path):
    from click.testing import CliRunner

    from r3v.cli import main

    out = tmp_path / "samples.jsonl"
    args = ["generate", "--backend", "openai", "--model", "teacher", "--limit", "3", "--n", "2", "--out", str(out)]
    with ChatServer(ScriptedAnswerer(echo)) as server:
        env = {"R3V_OPENAI_BASE_URL": server.base_url, "OPENAI_BASE_URL": None, "OPENAI_API_KEY": "sk-test"}
        first = CliRunner().invoke(main, args, env=env)
        assert first.exit_code == 0, first.output
        assert len(server.calls) == 3
        second = CliRunner().invoke(main, args, env=env)
        assert second.exit_code == 0, second.output
        assert len(server.calls) == 3  # everything was stored: nothing is asked again
    samples = [Sample.from_dict(r) for r in read_jsonl(out)]
    assert [(s.example_id, s.sample_index) for s in samples] == [(f"test-{i}", k) for i in range(3) for k in range(2)]
    # Calls arrive in any order (8 in flight); the texts name each call's seed, so compare as sets.
    assert sorted(s.text for s in samples) == sorted(t for call in server.calls for t in echo(call, 2))
    gold = {ex.id: ex.answer for ex in clevr_task.load("test", limit=3)}
    for sample in samples:  # scored by the task: extracted "Answer: k", compared with the gold answer
        assert sample.answer == sample.text.split("Answer: ")[1]
        assert sample.correct == (sample.answer == gold[sample.example_id])
