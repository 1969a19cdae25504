"""A fast, deterministic echo inference backend speaking SGLang's chat format.

An ordinary ``aiohttp.web`` application. ``rollout-sessions serve`` starts
one when no upstream is configured; tests, the demo and the benchmarks use
it as the backend whose answers they can predict.

Chat answers follow SGLang with ``logprobs``, ``return_prompt_token_ids`` and
``return_meta_info``: ``choices[0].prompt_token_ids`` (the request's
``input_ids`` when it sends them, else the toy template of ``template``, or
with a tokenizer the real chat template, ``tokenized``),
``choices[0].meta_info.output_token_logprobs`` and ``completion_tokens``.

Control fields for tests and demos ride in the request body under ``"echo"``
(the session server forwards unknown fields untouched)::

    {"echo": {"latency_ms": 500,        # answer after this delay
              "text": "...",            # reply text instead of "echo: <last message>"
              "tool_rounds": 2,         # tool calls before a text answer (needs "tools")
              "truncate": true,         # honour max_tokens: cut the completion, finish "length"
              "drift": true,            # with a tokenizer: a non-canonical tokenization
              "trailing": true,         # with a tokenizer: also the text after the stop token
              "reasoning": "...",       # reasoning_content of the reply
              "replay": true,           # meta_info.routed_experts and indexer_topk
              "replay_width": 2,        # ...shaped as SGLang sends them: base64 of int32,
                                        #    one row of this width per token but the last
              "finish_reason": "length",# the finish reason (meta_info's too)
              "weight_version": "v3",   # meta_info.weight_version
              "cached_tokens": 12,      # meta_info.cached_tokens (default 0)
              "logprobs_content": true, # also OpenAI-style choices[0].logprobs.content
              "status": 503,            # answer this status with a JSON error body
              "fault": "no_meta_info" | "no_logprobs" | "content_none" |
                       "count_mismatch" | "no_prompt_ids" | "bad_prompt_ids" |
                       "bad_tool_arguments" | "not_json" | "hang" | "close" |
                       "reset_mid_body"}}

Like a model, it honours ``tool_choice`` (``"none"``, ``"required"``, a named
function), ``stop`` (the text is cut before the first stop string, and
``matched_stop`` names it) and ``chat_template_kwargs.enable_thinking`` (the
reply then has ``reasoning_content``).

A request's ``n`` (> 1) is answered with n choices, choice i's text ending in
`` #i`` for i > 0 (each with its own ``prompt_token_ids`` and ``meta_info``).

Other routes: ``GET /v1/models``, ``POST /v1/completions``, ``/health``,
``GET /echo/stats``, ``POST /echo/reset``, ``GET /echo/requests`` (the last
chat bodies), ``* /echo/status/{code}``; any other request is answered 200
with a JSON description of itself (method, path, query, headers, body), so
the generic proxy can be checked end to end.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from aiohttp import web

from rollout_sessions.echo.template import completion_tokens, prompt_tokens

if TYPE_CHECKING:
    from rollout_sessions.echo.tokenized import TokenizedTemplate

HANG_S = 3600.0
# Answers still pending when the backend stops (a hang fault) are cut after this.
SHUTDOWN_S = 1.0
JSON = "application/json"


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


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


class EchoStats:
    """Counters for tests; ``inflight``/``max_concurrent`` count chat requests
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

    def __init__(
        self,
        latency_s: float = 0.0,
        model: str = "echo",
        tokenized: TokenizedTemplate | None = None,
    ) -> None:
        self.latency_s = latency_s
        self.model = model
        self.tokenized = tokenized
        self.stats = EchoStats()
        self.url = ""
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_route("*", "/health", self._health)
        app.router.add_get("/echo/stats", self._stats)
        app.router.add_post("/echo/reset", self._reset)
        app.router.add_get("/echo/requests", self._requests)
        app.router.add_route("*", "/{tail:.*}", self._describe)
        app.middlewares.append(self._count)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers ----------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.stats.requests += 1
        return await handler(request)

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(self.stats.as_dict())

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats = EchoStats()
        return _json({})

    async def _requests(self, request: web.Request) -> web.Response:
        return _json({"requests": list(self.stats.log)})

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "rollout-sessions"}
        return _json({"object": "list", "data": [card]})

    async def _describe(self, request: web.Request) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        status = 200
        if path.startswith("/echo/status/"):
            try:
                status = int(path.rsplit("/", 1)[1])
            except ValueError:
                status = 400
        body = await request.read()
        described = {
            "method": request.method,
            "path": path,
            "query": query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body": body.decode("utf-8", "replace"),
        }
        if status in (204, 304):
            return web.Response(status=status)
        return _json(described, status)

    async def _completion(self, request: web.Request) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "invalid JSON"}, 400)
        prompt = req.get("prompt") if isinstance(req, dict) else None
        text = "echo: " + (prompt if isinstance(prompt, str) else "")[:48]
        await asyncio.sleep(self.latency_s)
        return _json(
            {
                "id": f"cmpl-echo-{self._next_id()}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": req.get("model") or self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.chat_requests += 1
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _json({"error": {"message": f"invalid JSON: {exc}", "code": 400}}, 400)
        messages = req.get("messages") if isinstance(req, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return _json(
                {"error": {"message": "messages must be a list of objects", "code": 400}}, 400
            )
        stats.log.append(req)
        control = req.get("echo")
        if not isinstance(control, dict):
            control = {}
        fault = control.get("fault")
        delay = self.latency_s
        latency_ms = control.get("latency_ms")
        if isinstance(latency_ms, (int, float)):
            delay = latency_ms / 1000.0
        if fault == "hang":
            delay = HANG_S
        if delay > 0:
            stats.inflight += 1
            stats.max_concurrent = max(stats.max_concurrent, stats.inflight)
            try:
                await asyncio.sleep(delay)
            finally:
                stats.inflight -= 1
        if fault == "close":
            _abort(request)
            return web.Response(status=200)  # never sent: the connection is gone
        status = control.get("status")
        if isinstance(status, int) and status != 200:
            return _json(
                {"error": {"message": f"echo fault: status {status}", "code": status}}, status
            )
        if fault == "not_json":
            return web.Response(body=b"this is not json", content_type="text/plain")
        answer = orjson.dumps(self._chat_answer(req, messages, control, fault))
        if fault == "reset_mid_body":
            return await _reset_mid_body(request, answer)
        return web.Response(body=answer, content_type=JSON)

    def _chat_answer(
        self, req: dict[str, Any], messages: list[dict[str, Any]], control: dict, fault: Any
    ) -> dict[str, Any]:
        n = req.get("n")
        count = n if type(n) is int and 1 < n <= 64 else 1
        choices = [self._choice(req, messages, control, fault, i) for i in range(count)]
        prompt_len = choices[0]["_prompt_len"]
        completion_len = sum(c.pop("_completion_len") for c in choices)
        for choice in choices:
            del choice["_prompt_len"]
        return {
            "id": f"chatcmpl-echo-{self._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model") or self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_len,
                "completion_tokens": completion_len,
                "total_tokens": prompt_len + completion_len,
            },
        }

    def _choice(
        self,
        req: dict[str, Any],
        messages: list[dict[str, Any]],
        control: dict,
        fault: Any,
        index: int,
    ) -> dict[str, Any]:
        tools = req.get("tools")
        rounds = control.get("tool_rounds", 1 if tools else 0)
        done = _tool_rounds_done(messages)
        choice = req.get("tool_choice")
        want_tool = bool(control.get("tool_call")) or (
            bool(tools) and isinstance(rounds, int) and done < rounds and choice != "none"
        )
        # tool_choice as a model honours it: "required" or a named function
        # always calls one, "none" never does.
        named = _named_function(choice)
        if tools and (choice == "required" or named is not None):
            want_tool = True
        last = _last_text(messages)
        message: dict[str, Any] = {"role": "assistant"}
        matched = None
        if want_tool:
            name = named or "echo_tool"
            if named is None and tools and isinstance(tools[0], dict):
                name = (tools[0].get("function") or {}).get("name") or name
            # Written as models often write it (spaces after separators): a
            # client that re-serialises the arguments sends other bytes.
            arguments = json.dumps({"query": last[:32], "round": done})
            if fault == "bad_tool_arguments":
                arguments = "[1, 2]"  # JSON, but not an object
            message["content"] = ""
            message["tool_calls"] = [
                {
                    "id": f"call_{done}_{len(messages)}",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
            finish = "tool_calls"
        else:
            text = control.get("text")
            message["content"] = text if isinstance(text, str) else "echo: " + last[:48]
            if index:
                message["content"] += f" #{index}"
            finish = "stop"
            message["content"], matched = _stopped(message["content"], req.get("stop"))
        if isinstance(control.get("finish_reason"), str):
            finish = control["finish_reason"]
        reasoning = control.get("reasoning")
        kwargs = req.get("chat_template_kwargs")
        if not isinstance(reasoning, str) and isinstance(kwargs, dict):
            if kwargs.get("enable_thinking"):  # thinking asked for: the echo thinks aloud
                reasoning = "thinking about: " + last[:32]
        if isinstance(reasoning, str):
            message["reasoning_content"] = reasoning
        input_ids = req.get("input_ids")
        if self.tokenized is not None:
            drift = bool(control.get("drift"))
            trailing = bool(control.get("trailing"))
            completion = self.tokenized.completion_ids(messages, message, tools, drift, trailing)
            if not isinstance(input_ids, list):
                input_ids = self.tokenized.prompt_ids(messages, tools)
        else:
            completion = completion_tokens(message)
        max_tokens = req.get("max_tokens")
        if control.get("truncate") and isinstance(max_tokens, int) and len(completion) > max_tokens:
            # Cut at max_tokens, as a model that ran out of tokens (only when asked:
            # demos and benchmarks send small max_tokens and expect whole answers).
            completion = completion[:max_tokens]
            message.pop("tool_calls", None)
            if self.tokenized is not None:
                tokenizer = self.tokenized.tito.tokenizer
                message["content"] = tokenizer.decode(completion, skip_special_tokens=True)
            else:
                kept = bytes(t for t in completion if t < 256)
                message["content"] = kept.decode("utf-8", "ignore")
            finish = "length"
        if fault == "content_none":
            message["content"] = None
        prompt = list(input_ids) if isinstance(input_ids, list) else prompt_tokens(messages)
        if fault == "bad_prompt_ids":
            prompt = [299, *prompt]
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
        }
        if matched is not None:
            choice["matched_stop"] = matched  # as SGLang says which stop ended the text
        if req.get("return_prompt_token_ids") and fault != "no_prompt_ids":
            choice["prompt_token_ids"] = prompt
        if req.get("return_meta_info") and fault != "no_meta_info":
            meta: dict[str, Any] = {
                "id": "",
                "finish_reason": {"type": finish},
                "prompt_tokens": len(prompt),
                "completion_tokens": len(completion) + (1 if fault == "count_mismatch" else 0),
                "cached_tokens": control.get("cached_tokens", 0),
            }
            if "weight_version" in control:
                meta["weight_version"] = control["weight_version"]
            if req.get("logprobs") and fault != "no_logprobs":
                # Deterministic, finite, non-positive "logprobs".
                meta["output_token_logprobs"] = [[_logprob(t), t, None] for t in completion]
                if control.get("logprobs_content"):
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": f"<{t}>",
                                "logprob": _logprob(t),
                                "bytes": None,
                                "top_logprobs": [],
                            }
                            for t in completion
                        ]
                    }
            width = control.get("replay_width")
            if type(width) is int and width > 0:  # one row per token but the last
                meta["routed_experts"] = replay_payload(prompt + completion, width, 0)
                meta["indexer_topk"] = replay_payload(prompt + completion, width, 1)
            elif control.get("replay"):  # routing-replay payloads, as SGLang sends them
                meta["routed_experts"] = "AAECAw=="
                meta["indexer_topk"] = [[4], [5]]
            choice["meta_info"] = meta
        choice["_prompt_len"] = len(prompt)
        choice["_completion_len"] = len(completion)
        return choice


def replay_payload(tokens: list[int], width: int, salt: int) -> str:
    """A deterministic routing-replay payload: base64 of int32, ``len(tokens) - 1``
    rows of ``width`` (row i, column j: ``(tokens[i] + j + salt) % 64``)."""
    rows = np.asarray(tokens[:-1], dtype=np.int32)[:, None]
    values = (rows + np.arange(width, dtype=np.int32)[None, :] + salt) % 64
    return base64.b64encode(values.astype(np.int32).tobytes()).decode()


def _named_function(choice: Any) -> str | None:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return name if isinstance(name, str) else None
    return None


def _stopped(text: str, stop: Any) -> tuple[str, str | None]:
    """``text`` cut before the first of the ``stop`` strings in it, and which one."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut, matched = len(text), None
    for candidate in stops:
        if isinstance(candidate, str) and candidate:
            at = text.find(candidate)
            if 0 <= at < cut:
                cut, matched = at, candidate
    return text[:cut], matched


def _logprob(token: int) -> float:
    return -(token % 7) / 8.0


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _reset_mid_body(request: web.Request, body: bytes) -> web.StreamResponse:
    """Announce the whole body, send half of it, then reset the connection."""
    resp = web.StreamResponse(headers={"Content-Type": JSON})
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    _abort(request)
    return resp


async def start_echo_backend(
    host: str = "127.0.0.1",
    port: int = 0,
    latency_s: float = 0.0,
    tokenized: TokenizedTemplate | None = None,
) -> EchoBackend:
    """Start an echo backend on the running loop; ``.url`` tells where."""
    backend = EchoBackend(latency_s=latency_s, tokenized=tokenized)
    await backend.start(host, port)
    return backend
