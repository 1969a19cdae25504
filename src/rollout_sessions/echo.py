"""A fast, deterministic echo inference backend speaking SGLang's chat format.

Used by ``rollout-sessions serve`` when no upstream is configured, by the
tests, and by the benchmarks (which measure the session server's overhead
against it, so it is a raw asyncio protocol on ``httptools``, not a framework).

Token ids are a toy chat template, deterministic and stateless:

- a message is ``[ROLE(role)] + body(message) + [EOT]`` where ``body`` is the
  UTF-8 bytes of its reasoning, content and tool calls (ids 0-255);
- the prompt of a turn is the messages in order plus ``[ROLE(assistant)]``;
- the completion of a turn is ``body(reply) + [EOT]``.

So the prompt of turn k+1 always extends turn k's prompt plus completion ids,
exactly as a real backend reusing the KV prefix does, as long as the client
sends the assistant message back unchanged.

Control fields for tests and demos ride in the request body under ``"echo"``
(the session server forwards unknown fields untouched)::

    {"echo": {"latency_ms": 500,        # answer after this delay
              "text": "...",            # reply text instead of "echo: <last message>"
              "tool_rounds": 2,         # tool calls before a text answer (needs "tools")
              "status": 503,            # answer this status with a JSON error body
              "fault": "no_meta_info" | "no_logprobs" | "content_none" |
                       "count_mismatch" | "no_prompt_ids" | "bad_prompt_ids" |
                       "not_json" | "hang" | "close"}}

Other routes: ``GET /v1/models``, ``POST /v1/completions``, ``GET /health``,
``GET /echo/stats``, ``POST /echo/reset``, ``GET /echo/requests`` (last chat
bodies), ``* /echo/status/{code}``; any other path answers 200 with a JSON
description of the request (method, path, query, headers, body) so that the
generic proxy can be checked end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import httptools
import orjson

# Token ids above the byte range: the toy template's special tokens.
EOT = 300
TOOL_CALL = 301
THINK = 302
ROLE_IDS = {"system": 256, "user": 257, "assistant": 258, "tool": 259, "developer": 260}
ROLE_OTHER = 261
ASSISTANT = ROLE_IDS["assistant"]

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    404: b"Not Found",
    413: b"Payload Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_HANG_S = 3600.0


def _text_tokens(value: Any) -> bytes:
    if not value:
        return b""
    if isinstance(value, str):
        return value.encode()
    # Structured content (a list of parts): its canonical JSON.
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def body_tokens(message: dict[str, Any]) -> list[int]:
    """The ids of a message's body: what the template renders between role and EOT."""
    out: list[int] = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        out.append(THINK)
        out += _text_tokens(reasoning)
    out += _text_tokens(message.get("content"))
    tool_calls = message.get("tool_calls")
    if tool_calls:
        for call in tool_calls:
            function = call.get("function") or {}
            out.append(TOOL_CALL)
            out += _text_tokens(function.get("name") or "")
            out.append(32)
            out += _text_tokens(function.get("arguments") or "")
    return out


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt ids of a chat request (generation prompt included)."""
    out: list[int] = []
    for message in messages:
        out.append(ROLE_IDS.get(message.get("role"), ROLE_OTHER))
        out += body_tokens(message)
        out.append(EOT)
    out.append(ASSISTANT)
    return out


def _last_text(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        content = message.get("content")
        if isinstance(content, str) and content:
            return content
    return ""


def _tool_rounds_done(messages: Sequence[dict[str, Any]]) -> int:
    """Assistant turns since the last user message."""
    done = 0
    for message in reversed(messages):
        role = message.get("role")
        if role == "user":
            break
        if role == "assistant":
            done += 1
    return done


class EchoStats:
    """Counters for tests: ``inflight``/``max_concurrent`` count chat requests
    waiting out a latency (the ones that can overlap)."""

    __slots__ = ("requests", "chat_requests", "inflight", "max_concurrent", "log")

    def __init__(self) -> None:
        self.requests = 0
        self.chat_requests = 0
        self.inflight = 0
        self.max_concurrent = 0
        self.log: collections.deque[Any] = collections.deque(maxlen=256)

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "chat_requests": self.chat_requests,
            "inflight": self.inflight,
            "max_concurrent": self.max_concurrent,
        }


class EchoBackend:
    """A running echo backend: ``.url``, ``.stats``, ``await .close()``."""

    def __init__(self, latency_s: float = 0.0, model: str = "echo") -> None:
        self.latency_s = latency_s
        self.model = model
        self.stats = EchoStats()
        self.host = ""
        self.port = 0
        self.url = ""
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_EchoProtocol] = set()
        self._counter = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _EchoProtocol(self), host, port, backlog=4096, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = host, sockname[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.abort()
        await server.wait_closed()

    # -- request handling -------------------------------------------------

    def handle(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes):
        """Returns ``(status, body, content_type, delay_s, action)``."""
        self.stats.requests += 1
        path, _, query = target.partition("?")
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(body)
        if method == "GET" and path == "/v1/models":
            data = {"object": "list", "data": [self._model_card()]}
            return 200, orjson.dumps(data), b"application/json", 0.0, None
        if method == "POST" and path == "/v1/completions":
            return self._completion(body)
        if path == "/health":
            return 200, b'{"status":"ok"}', b"application/json", 0.0, None
        if path == "/echo/stats":
            return 200, orjson.dumps(self.stats.as_dict()), b"application/json", 0.0, None
        if path == "/echo/reset" and method == "POST":
            self.stats = EchoStats()
            return 200, b"{}", b"application/json", 0.0, None
        if path == "/echo/requests":
            data = {"requests": list(self.stats.log)}
            return 200, orjson.dumps(data), b"application/json", 0.0, None
        status = 200
        if path.startswith("/echo/status/"):
            try:
                status = int(path.rsplit("/", 1)[1])
            except ValueError:
                status = 400
        described = {
            "method": method,
            "path": path,
            "query": query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
            "body": body.decode("utf-8", "replace"),
        }
        return status, orjson.dumps(described), b"application/json", 0.0, None

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "rollout-sessions"}

    def _completion(self, body: bytes):
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, b'{"error":"invalid JSON"}', b"application/json", 0.0, None
        prompt = req.get("prompt") if isinstance(req, dict) else None
        text = "echo: " + (prompt if isinstance(prompt, str) else "")[:48]
        data = {
            "id": f"cmpl-echo-{self._next_id()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.get("model") or self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        }
        return 200, orjson.dumps(data), b"application/json", self.latency_s, None

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter

    def _chat(self, body: bytes):
        stats = self.stats
        stats.chat_requests += 1
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            err = {"error": {"message": f"invalid JSON: {exc}", "type": "BadRequest", "code": 400}}
            return 400, orjson.dumps(err), b"application/json", 0.0, None
        messages = req.get("messages") if isinstance(req, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            err = {"error": {"message": "messages must be a list of objects", "code": 400}}
            return 400, orjson.dumps(err), b"application/json", 0.0, None
        stats.log.append(req)
        control = req.get("echo")
        if not isinstance(control, dict):
            control = {}
        delay = self.latency_s
        latency_ms = control.get("latency_ms")
        if isinstance(latency_ms, (int, float)):
            delay = latency_ms / 1000.0
        fault = control.get("fault")
        if fault == "hang":
            return 200, b"", b"application/json", _HANG_S, "hang"
        if fault == "close":
            return 200, b"", b"application/json", delay, "close"
        status = control.get("status")
        if isinstance(status, int) and status != 200:
            err = {"error": {"message": f"echo fault: status {status}", "code": status}}
            return status, orjson.dumps(err), b"application/json", delay, None
        if fault == "not_json":
            return 200, b"this is not json", b"text/plain", delay, None
        return (
            200,
            self._chat_answer(req, messages, control, fault),
            b"application/json",
            delay,
            None,
        )

    def _chat_answer(
        self, req: dict[str, Any], messages: list[dict[str, Any]], control: dict, fault: Any
    ) -> bytes:
        tools = req.get("tools")
        rounds = control.get("tool_rounds", 1 if tools else 0)
        want_tool = bool(control.get("tool_call")) or (
            bool(tools) and isinstance(rounds, int) and _tool_rounds_done(messages) < rounds
        )
        last = _last_text(messages)
        message: dict[str, Any] = {"role": "assistant"}
        if want_tool:
            name = "echo_tool"
            if tools and isinstance(tools[0], dict):
                name = (tools[0].get("function") or {}).get("name") or name
            turn = _tool_rounds_done(messages)
            arguments = orjson.dumps({"query": last[:32], "round": turn}).decode()
            message["content"] = ""
            message["tool_calls"] = [
                {
                    "id": f"call_{turn}_{len(messages)}",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
            finish = "tool_calls"
        else:
            text = control.get("text")
            message["content"] = text if isinstance(text, str) else "echo: " + last[:48]
            finish = "stop"
        completion = body_tokens(message)
        completion.append(EOT)
        if fault == "content_none":
            message["content"] = None
        prompt = prompt_tokens(messages)
        if fault == "bad_prompt_ids":
            prompt = [299, *prompt]
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
        }
        if req.get("return_prompt_token_ids") and fault != "no_prompt_ids":
            choice["prompt_token_ids"] = prompt
        n_completion = len(completion)
        if req.get("return_meta_info") and fault != "no_meta_info":
            meta: dict[str, Any] = {
                "id": "",
                "finish_reason": {"type": finish},
                "prompt_tokens": len(prompt),
                "completion_tokens": n_completion + (1 if fault == "count_mismatch" else 0),
                "cached_tokens": 0,
            }
            if req.get("logprobs") and fault != "no_logprobs":
                # Deterministic, finite, non-positive "logprobs".
                meta["output_token_logprobs"] = [[-(t % 7) / 8.0, t] for t in completion]
            choice["meta_info"] = meta
        answer = {
            "id": f"chatcmpl-echo-{self._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model") or self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": n_completion,
                "total_tokens": len(prompt) + n_completion,
            },
        }
        return orjson.dumps(answer)


class _EchoProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; answers in request order on each connection."""

    __slots__ = (
        "backend",
        "parser",
        "transport",
        "url",
        "headers",
        "body",
        "tail",
        "closed",
    )

    def __init__(self, backend: EchoBackend) -> None:
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.tail: asyncio.Future[Any] | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.backend._connections.discard(self)
        if self.tail is not None and not self.tail.done():
            self.tail.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(400, b'{"error":"upgrade not supported"}', b"application/json", False)
        except httptools.HttpParserError:
            self._send(400, b'{"error":"bad request"}', b"application/json", False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        keep_alive = self.parser.should_keep_alive()
        body = b"".join(self.body)
        backend = self.backend
        status, payload, ctype, delay, action = backend.handle(
            method, self.url.decode("latin-1"), self.headers, body
        )
        is_chat = self.url.startswith(b"/v1/chat/completions")
        if method == "HEAD":
            payload = b""
        if delay <= 0 and action is None and self.tail is None:
            self._send(status, payload, ctype, keep_alive)
            return
        stats = backend.stats
        if is_chat:
            stats.inflight += 1
            if stats.inflight > stats.max_concurrent:
                stats.max_concurrent = stats.inflight
        previous = self.tail
        self.tail = asyncio.ensure_future(
            self._later(
                previous,
                stats if is_chat else None,
                status,
                payload,
                ctype,
                delay,
                action,
                keep_alive,
            )
        )

    async def _later(
        self,
        previous: asyncio.Future[Any] | None,
        stats: EchoStats | None,
        status: int,
        payload: bytes,
        ctype: bytes,
        delay: float,
        action: str | None,
        keep_alive: bool,
    ) -> None:
        try:
            if previous is not None and not previous.done():
                await previous
            if delay > 0:
                await asyncio.sleep(delay)
            if action == "close":
                self.abort()
                return
            self._send(status, payload, ctype, keep_alive)
        finally:
            if stats is not None:
                stats.inflight -= 1
            if self.tail is asyncio.current_task():
                self.tail = None

    def _send(self, status: int, payload: bytes, ctype: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        reason = _REASONS.get(status, b"Status")
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
            status,
            reason,
            ctype,
            len(payload),
        )
        if not keep_alive:
            transport.write(head + b"connection: close\r\n\r\n" + payload)
            transport.close()
            return
        transport.write(head + b"\r\n" + payload)


async def start_echo_backend(
    host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0
) -> EchoBackend:
    """Start an echo backend on the running loop; ``.url`` tells where."""
    backend = EchoBackend(latency_s=latency_s)
    await backend.start(host, port)
    return backend


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rollout-sessions echo-backend",
        description="Deterministic echo inference backend (SGLang-style chat answers).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port, 0 for any (default 8001)")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before every answer (default 0)"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    backend = await start_echo_backend(args.host, args.port, args.latency_ms / 1000.0)
    print(f"echo backend listening on {backend.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``rollout-sessions echo-backend [--host H] [--port P] [--latency-ms MS]``."""
    args = _parse_args(argv)
    try:
        import uvloop

        uvloop.run(_serve(args))
    except ImportError:
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
