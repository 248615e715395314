"""A real OpenAI-compatible chat server on loopback, for testing the ``openai`` backend.

``ChatServer`` serves ``POST /v1/chat/completions`` with ``http.server.ThreadingHTTPServer`` on
127.0.0.1 and an ephemeral port, in a background thread. What it answers comes from an answerer:

- ``ModelAnswerer`` runs a real r3v backend (the tiny HF model): it decodes the base64 PNG data
  URLs back into PIL images, rebuilds r3v ``Request``s and returns real generations with usage.
- ``ScriptedAnswerer`` calls a function that writes the texts (a "teacher" that knows the answers),
  with token counts from a stated rule (whitespace-separated words).

A scripted plan of faults (by arrival number) makes it answer 429 with Retry-After, 5xx, slow
replies, malformed bodies or a 4xx with a message, so retries and timeouts meet a real socket.
Every call is recorded in ``calls``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from r3v.records import Request, Sampling

ENDPOINT = "/v1/chat/completions"


@dataclass
class Fault:
    """What to do instead of (or before) answering one call.

    kind: "status" (reply ``status`` with ``message`` and an optional Retry-After), "slow" (sleep
    ``delay_s``, then answer normally), "not-json" (200 with a body that is not JSON),
    "no-choices" (200 with a JSON body without choices).
    """

    kind: str
    status: int = 500
    message: str = "injected failure"
    retry_after: str | None = None
    code: str | None = None  # OpenAI's machine-readable error.code, e.g. "insufficient_quota"
    delay_s: float = 0.0


@dataclass
class Call:
    """One request the server received, decoded."""

    number: int
    payload: dict[str, Any]
    prompt: str
    images: list[Image.Image]
    authorization: str | None

    @property
    def n(self) -> int:
        return int(self.payload.get("n", 1))


@dataclass
class Reply:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int


class ModelAnswerer:
    """Answers with a real r3v backend; temperature 0 means greedy decoding."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._lock = threading.Lock()  # one generate at a time: torch's global RNG is seeded per call

    def __call__(self, call: Call, n: int) -> Reply:
        payload = call.payload
        max_tokens = int(payload.get("max_tokens", 16))
        seed = int(payload.get("seed", 0))
        if float(payload.get("temperature", 1.0)) == 0.0:
            sampling = Sampling.greedy_decoding(max_new_tokens=max_tokens, seed=seed)
        else:
            sampling = Sampling(
                n=n,
                temperature=float(payload["temperature"]),
                top_p=float(payload.get("top_p", 1.0)),
                top_k=int(payload.get("top_k", 0)),
                max_new_tokens=max_tokens,
                seed=seed,
            )
        request = Request.user(call.prompt, call.images)
        with self._lock:
            completions = self.backend.generate([request], sampling)[0][:n]
        return Reply(
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            prompt_tokens=completions[0].prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in completions),
        )


class ScriptedAnswerer:
    """Answers with ``write(call, n) -> n texts``; tokens are whitespace-separated words."""

    def __init__(self, write: Callable[[Call, int], list[str]]) -> None:
        self.write = write

    def __call__(self, call: Call, n: int) -> Reply:
        texts = self.write(call, n)
        return Reply(
            texts=texts,
            finish_reasons=["stop"] * len(texts),
            prompt_tokens=word_count(call.prompt),
            completion_tokens=sum(word_count(t) for t in texts),
        )


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class ChatServer:
    """Start with ``with ChatServer(answerer) as server:``; ``server.base_url`` ends in ``/v1``.

    ``faults`` maps a call's arrival number (1-based) to a Fault. ``max_choices`` caps the
    choices per reply, like servers that ignore ``n``. With ``api_key`` set, other keys get 401.
    """

    answerer: Callable[[Call, int], Reply]
    faults: dict[int, Fault] = field(default_factory=dict)
    max_choices: int | None = None
    api_key: str | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self)

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True  # a thread still sleeping in a "slow" fault must not block exit
        # A short poll interval keeps shutdown (which waits for the next poll) fast.
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    def prompts(self) -> list[str]:
        with self._lock:
            return [c.prompt for c in self.calls]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        try:
            self._respond(handler)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the reply was written

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path != ENDPOINT:
            return _send_json(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        length = int(handler.headers.get("Content-Length", 0))
        try:
            payload = json.loads(handler.rfile.read(length))
        except ValueError:
            return _send_json(handler, 400, {"error": {"message": "request body is not JSON"}})
        prompt, images = decode_messages(payload.get("messages", []))
        with self._lock:
            call = Call(len(self.calls) + 1, payload, prompt, images, handler.headers.get("Authorization"))
            self.calls.append(call)
            fault = self.faults.get(call.number)
        if self.api_key is not None and call.authorization != f"Bearer {self.api_key}":
            return _send_json(handler, 401, {"error": {"message": "Incorrect API key provided"}})
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            error = {"message": fault.message, **({"code": fault.code} if fault.code else {})}
            return _send_json(handler, fault.status, {"error": error}, headers)
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if fault is not None and fault.kind == "not-json":
            return _send_bytes(handler, 200, b"<html>502 Bad Gateway</html>", "text/html")
        if fault is not None and fault.kind == "no-choices":
            return _send_json(handler, 200, {"object": "chat.completion", "model": payload.get("model")})
        n = call.n if self.max_choices is None else min(call.n, self.max_choices)
        reply = self.answerer(call, n)
        _send_json(handler, 200, completion_body(call, reply))


def decode_messages(messages: list[dict[str, Any]]) -> tuple[str, list[Image.Image]]:
    """The text (parts joined by newlines) and the images of OpenAI-shaped messages."""
    texts, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                header, _, data = url.partition(",")
                assert header == "data:image/png;base64", header
                images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return "\n".join(texts), images


def completion_body(call: Call, reply: Reply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{call.number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.payload.get("model"),
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for i, (text, reason) in enumerate(zip(reply.texts, reply.finish_reasons, strict=True))
        ],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict | None = None) -> None:
    _send_bytes(handler, status, json.dumps(body).encode(), "application/json", headers)


def _send_bytes(
    handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str, headers: dict | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
