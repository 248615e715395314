"""Generation through an OpenAI-compatible chat API: hosted models, ``vllm serve``, SGLang.

Each request becomes one ``POST {base_url}/chat/completions`` with the images inlined as base64
PNG data URLs. Only the standard library is used (urllib and a thread pool), so a teacher served
anywhere can write rationales without extra dependencies.

Failure policy:

- 429 (except OpenAI's ``insufficient_quota``), 5xx, timeouts and refused or dropped
  connections are transient: retried up to ``max_retries`` times with exponential backoff and
  jitter, or after the server's ``Retry-After``.
- Any other 4xx (bad key, unknown model, context too long) fails at once with the server's message.
- A 200 whose body is not a chat completion (not JSON, no ``choices``) is retried once, since a
  proxy can truncate a body; a second malformed body in a row fails with a snippet of it.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

from PIL import Image

from r3v import errors
from r3v.records import Completion, Request, Sampling
from r3v.registry import backends
from r3v.seeds import derive_seed

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = ("R3V_OPENAI_BASE_URL", "OPENAI_BASE_URL")
#: Hosts that always need a key; a local server usually does not.
KEYED_HOSTS = ("api.openai.com",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class BackendError(errors.BackendError):
    """A chat API call that failed for good: a client error, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class OpenAIOptions:
    """Settings of the ``openai`` backend (pass them as keyword arguments to the backend)."""

    base_url: str | None = None
    """API root, e.g. ``http://localhost:8000/v1``. Default: $R3V_OPENAI_BASE_URL, $OPENAI_BASE_URL,
    then https://api.openai.com/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key. Keys are never read from files."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    timeout_s: float = 120.0
    """Socket timeout per request (connect, and each read while waiting for the reply)."""
    max_retries: int = 5
    """Retries of a transient failure (429, 5xx, timeout) before giving up."""
    backoff_base_s: float = 1.0
    """First backoff delay; it doubles per retry, with jitter in [delay/2, delay]."""
    backoff_max_s: float = 60.0
    """Cap on one backoff delay (a server's Retry-After is honoured even above it)."""
    retry_seed: int = 0
    """Seed of the jitter, so a run with the same failures waits the same delays."""
    send_seed: bool = True
    """Send ``seed`` (OpenAI, vLLM and SGLang accept it; sampling is then reproducible on vLLM)."""
    send_top_k: bool = False
    """Send ``top_k`` too. vLLM and SGLang accept it; the OpenAI API rejects it."""
    max_n: int | None = None
    """Most choices to ask for in one request (some servers accept only n=1)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra JSON fields merged into every request (e.g. a server-specific option)."""


@dataclass
class Usage:
    """Totals over this backend's lifetime, as the server reported them."""

    requests: int = 0  # successful responses
    attempts: int = 0  # HTTP attempts, failed ones included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@backends.register("openai")
class OpenAIBackend:
    """An OpenAI-compatible chat completions server (OpenAI, vllm serve, SGLang) over HTTP."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        trust_remote_code: bool = False,  # accepted for a uniform signature; the server decides
        **options: Any,
    ) -> None:
        if adapter is not None:
            raise ValueError(
                "the openai backend cannot apply an adapter: load it in the server "
                "(e.g. vllm serve BASE --enable-lora --lora-modules NAME=PATH) and pass NAME as the model"
            )
        known = {f.name for f in fields(OpenAIOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown openai backend option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        self.options = OpenAIOptions(**options)
        if self.options.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.options.max_n is not None and self.options.max_n < 1:
            raise ValueError("max_n must be at least 1")
        self.model_id = model
        self.base_url = resolve_base_url(self.options.base_url)
        self.endpoint = self.base_url + "/chat/completions"
        self._api_key = os.environ.get(self.options.api_key_env) or None
        if self._api_key is None and urlparse(self.base_url).hostname in KEYED_HOSTS:
            raise ValueError(
                f"{self.base_url} needs an API key: set the environment variable {self.options.api_key_env}"
            )
        # A server on this machine is never reached through a proxy, whatever HTTP(S)_PROXY says.
        loopback = urlparse(self.base_url).hostname in LOOPBACK_HOSTS
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
        self.usage = Usage()
        #: (status or error kind, delay in seconds) for every retry, in the order they happened.
        self.retry_log: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        messages = [chat_messages(r) for r in requests]
        jobs = [functools.partial(self._complete, i, m, sampling) for i, m in enumerate(messages)]
        return run_bounded(jobs, self.options.max_concurrency)

    def _complete(self, index: int, messages: list[dict], sampling: Sampling) -> list[Completion]:
        """All choices for one request, topping up when the server returns fewer than asked."""
        wanted = 1 if sampling.greedy else sampling.n
        got: list[Completion] = []
        round_index = 0
        while len(got) < wanted:
            ask = wanted - len(got)
            if self.options.max_n is not None:
                ask = min(ask, self.options.max_n)
            payload = self._payload(messages, sampling, ask, request_seed(sampling.seed, index, round_index))
            rng = random.Random(request_seed(self.options.retry_seed, index, round_index))
            got += self._post(payload, rng)[: wanted - len(got)]
            round_index += 1
        return got * sampling.n if sampling.greedy else got

    def _payload(self, messages: list[dict], sampling: Sampling, n: int, seed: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model_id,
            "messages": messages,
            "n": n,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.greedy:
            payload["temperature"] = 0.0
        else:
            payload["temperature"] = sampling.temperature
            payload["top_p"] = sampling.top_p
            if self.options.send_top_k and sampling.top_k:
                payload["top_k"] = sampling.top_k
        if self.options.send_seed:
            payload["seed"] = seed
        payload.update(self.options.extra_body)
        return payload

    def _post(self, payload: dict[str, Any], rng: random.Random) -> list[Completion]:
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        retries = 0
        last_malformed = False
        while True:
            self._count(attempts=1)
            completions, failure, retry_after = self._attempt(data, headers)
            if completions is not None:
                return completions
            malformed = failure.startswith("malformed")
            if malformed and last_malformed:
                raise BackendError(f"{self.endpoint}: {failure} (twice in a row)")
            last_malformed = malformed
            if retries >= self.options.max_retries:
                raise BackendError(
                    f"{self.endpoint}: gave up after {retries + 1} attempts; last error: {failure}",
                    status=_status_of(failure),
                )
            delay = retry_after if retry_after is not None else self._backoff(retries, rng)
            retries += 1
            with self._lock:
                self.usage.retries += 1
                self.retry_log.append((failure.split(":")[0], delay))
            log.warning(
                "%s: %s; retry %d/%d in %.2f s",
                self.endpoint,
                failure,
                retries,
                self.options.max_retries,
                delay,
            )
            time.sleep(delay)

    def _attempt(
        self, data: bytes, headers: dict[str, str]
    ) -> tuple[list[Completion] | None, str, float | None]:
        """One HTTP call: (completions, "", None) on success, or (None, the transient failure,
        the server's Retry-After). Permanent failures raise."""
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        timeout = f"timeout: no reply within {self.options.timeout_s} s"
        try:
            with self._opener.open(request, timeout=self.options.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = _read_quietly(exc)
            message = error_message(body)
            # OpenAI answers an exhausted quota (billing) with 429 too, but waiting will not fix it.
            transient = (exc.code == 429 and error_code(body) != "insufficient_quota") or exc.code >= 500
            if transient:
                return None, f"HTTP {exc.code}: {message}", parse_retry_after(exc.headers.get("Retry-After"))
            raise BackendError(
                f"{self.endpoint} refused the request: HTTP {exc.code}: {message}", status=exc.code
            ) from exc
        except TimeoutError:
            return None, timeout, None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return None, timeout, None
            return None, f"connection failed: {exc.reason}", None
        except (ConnectionError, http.client.HTTPException) as exc:
            return None, f"connection failed: {exc!r}", None
        try:
            completions, prompt_tokens, completion_tokens = parse_completion_body(body)
        except ValueError as exc:
            return None, f"malformed response: {exc}", None
        self._count(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return completions, "", None

    def _backoff(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.options.backoff_max_s, self.options.backoff_base_s * 2**retry)
        return ceiling * (0.5 + 0.5 * rng.random())

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self.usage, name, getattr(self.usage, name) + amount)


def run_bounded(jobs: list[Callable[[], T]], limit: int) -> list[T]:
    """Run ``jobs`` on at most ``limit`` threads; results in job order. The first error stops
    new jobs from starting and is raised.

    Daemon threads rather than ``concurrent.futures``: its workers are joined at interpreter
    exit, so a Ctrl-C would hang until every request in flight timed out. Here the main thread
    waits in ``join``, which a signal interrupts, and abandoned requests die with the process.
    """
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    queue = iter(range(len(jobs)))
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                index = next(queue, None)
            if index is None:
                return
            try:
                results[index] = jobs[index]()
            except BaseException as exc:  # handed to the caller's thread below
                with lock:
                    errors.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(limit, len(jobs)))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()  # after a Ctrl-C: start no new request
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def resolve_base_url(base_url: str | None) -> str:
    for candidate in (base_url, *(os.environ.get(name) for name in BASE_URL_ENV)):
        if candidate:
            url = candidate.rstrip("/")
            if not urlparse(url).scheme.startswith("http"):
                raise ValueError(f"base URL must start with http:// or https://, got {candidate!r}")
            return url
    return DEFAULT_BASE_URL


def request_seed(seed: int, index: int, round_index: int) -> int:
    """A 31-bit seed per (run seed, request, top-up round): servers store seeds as signed ints."""
    return derive_seed(seed, index, round_index)


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(request: Request) -> list[dict[str, Any]]:
    """The request's messages in the OpenAI shape: each image part becomes an ``image_url`` part."""
    images = iter(request.images)
    out = []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                image = next(images, None)
                if image is None:
                    raise ValueError("the request has more image parts than images")
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"cannot send a message part of type {part.get('type')!r}")
        out.append({"role": message["role"], "content": parts})
    if next(images, None) is not None:
        raise ValueError("the request has more images than image parts")
    return out


def parse_completion_body(body: bytes) -> tuple[list[Completion], int, int]:
    """Completions and the (prompt, completion) token totals from a chat completion body.

    The server reports completion tokens for all choices together, so they are shared out
    between the choices in proportion to their text length (the shares sum to the total).
    Each completion carries the request's prompt tokens, as the HF backend's do.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON ({exc}): {_snippet(body)}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError(f"no 'choices' in the body: {_snippet(body)}")
    texts, reasons = [], []
    for choice in sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise ValueError(f"a choice without a 'message': {_snippet(body)}")
        content = message.get("content")
        texts.append(content if isinstance(content, str) else "")
        reasons.append(choice.get("finish_reason") or "")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    shares = split_proportionally(completion_tokens, [len(t) for t in texts])
    completions = [
        Completion(text=t, prompt_tokens=prompt_tokens, completion_tokens=s, finish_reason=r)
        for t, s, r in zip(texts, shares, reasons, strict=True)
    ]
    return completions, prompt_tokens, completion_tokens


def split_proportionally(total: int, weights: list[int]) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainders get the rest)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def error_message(body: bytes) -> str:
    """The server's own error message (OpenAI and vLLM shapes), else the start of the body."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _snippet(body) or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
    return _snippet(body)


def error_code(body: bytes) -> str | None:
    """The machine-readable ``error.code`` of an OpenAI-shaped error body, if any."""
    try:
        error = json.loads(body.decode("utf-8")).get("error")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return str(error.get("code")) if isinstance(error, dict) and error.get("code") else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_quietly(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except OSError:
        return b""


def _status_of(failure: str) -> int | None:
    if failure.startswith("HTTP "):
        return int(failure.split()[1].rstrip(":"))
    return None


def _snippet(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."
