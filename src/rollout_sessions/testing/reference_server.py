"""FastAPI + uvicorn reference server with the production PR's semantics.

The baseline of the HTTP benchmarks (lifecycle, chat, tombstone capacity).
It is the production session server as of the "make delete stick" PR,
written for this project without its tokenizer:

- registry: ``reference_registry.ReferenceRegistry`` (dict of sessions,
  deque+set of the last 10k deleted ids, auto-create of never-seen ids with
  the full idle scan on every auto-create);
- sessions are plain dataclasses with their lock and lists built eagerly;
  records and the GET answer are pydantic models, as in production;
- the chat route proxies like production: ``httpx.AsyncClient``, stdlib
  ``json`` for every parse and dump, forced SGLang flags, lock held only
  around the two state phases, the answer re-parsed and re-rendered with
  ``JSONResponse``, the record appended under the lock.

Left out, on purpose: tokenization (production renders the chat template and
decodes completions with a Hugging Face tokenizer; that cost would only
widen the gap, so the reference takes ``prompt_token_ids`` from the backend
as our server does), the per-request debug logging middleware and uvicorn's
access log (our server does not log per request either). The upstream pool
is sized generously (4096 connections) so the reference is not starved at
1024 concurrent sessions.

Run: ``python -m rollout_sessions.testing.reference_server --port 8100 --upstream http://127.0.0.1:8200``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from rollout_sessions.testing.reference_registry import (
    DELETED,
    LIVE,
    NEVER_SEEN,
    PRODUCTION_SESSION_TTL_S,
    PRODUCTION_TOMBSTONE_CAPACITY,
    ProductionLikeSession,
    ReferenceRegistry,
)

_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


class SessionRecord(BaseModel):
    timestamp: float
    method: str
    path: str
    status_code: int
    request: dict
    response: dict


class GetSessionResponse(BaseModel):
    session_id: str
    records: list[SessionRecord]
    metadata: dict


class SessionNotFound(Exception):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session not found: session_id={session_id}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _messages_match(stored: list[dict], request: list[dict]) -> int:
    n = 0
    for a, b in zip(stored, request, strict=False):
        if a != b:
            break
        n += 1
    return n


def _prepare(session: ProductionLikeSession, messages: list[dict]) -> None:
    """Append-only check with at most one assistant step of rollback."""
    stored = session.messages
    if not stored:
        return
    matched = _messages_match(stored, messages)
    if matched >= len(stored):
        return
    keep = -1
    for i in range(len(session.checkpoint_message_ends) - 1, -1, -1):
        if session.checkpoint_message_ends[i] <= matched:
            keep = i
            break
    if session.num_assistant - (keep + 1) > 1:
        raise ValueError("rollback failed: more than one assistant step back")
    end = session.checkpoint_message_ends[keep] if keep >= 0 else 0
    session.messages = stored[:end]
    session.trajectory_token_ids = session.trajectory_token_ids[: keep + 1]
    session.records = session.records[: keep + 1]
    session.checkpoint_message_ends = session.checkpoint_message_ends[: keep + 1]
    session.num_assistant = keep + 1


def build_app(
    upstream: str | None,
    tombstone_capacity: int = PRODUCTION_TOMBSTONE_CAPACITY,
    ttl: float = PRODUCTION_SESSION_TTL_S,
    timeout: float | None = 600.0,
    pool: int | None = None,
    client_lib: str = "httpx",
) -> FastAPI:
    registry = ReferenceRegistry(tombstone_capacity=tombstone_capacity, ttl=ttl)
    instance_id = uuid.uuid4().hex
    # pool=None: httpx's default limits, as production's session server uses.
    # "httpx2" (pydantic's fork, whose pool is not quadratic in connections)
    # only to show the reference was not starved by its client library.
    hx = importlib.import_module(client_lib)
    limits = (
        hx.Limits(max_connections=pool, max_keepalive_connections=pool)
        if pool
        else hx.Limits(max_connections=100, max_keepalive_connections=20)
    )
    client = hx.AsyncClient(timeout=hx.Timeout(timeout), limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    app.state.registry = registry

    @app.exception_handler(SessionNotFound)
    async def _not_found(request: Request, exc: SessionNotFound) -> JSONResponse:
        return _error(404, str(exc))

    async def do_proxy(request: Request, path: str, body: bytes | None = None) -> dict[str, Any]:
        if upstream is None:
            return {
                "response_body": json.dumps({"error": "no upstream configured"}).encode(),
                "status_code": 502,
                "headers": {"content-type": "application/json"},
            }
        if body is None:
            body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            resp = await client.request(
                request.method, f"{upstream}/{path}", content=body, headers=headers
            )
            content = await resp.aread()
        except hx.TimeoutException:
            return {
                "response_body": json.dumps({"error": "Gateway Timeout"}).encode(),
                "status_code": 504,
                "headers": {"content-type": "application/json"},
            }
        except hx.TransportError:
            return {
                "response_body": json.dumps({"error": "Bad Gateway"}).encode(),
                "status_code": 502,
                "headers": {"content-type": "application/json"},
            }
        return {
            "response_body": content,
            "status_code": resp.status_code,
            "headers": dict(resp.headers),
        }

    def build_proxy_response(result: dict[str, Any]) -> Response:
        content = result["response_body"]
        headers = {k: v for k, v in result["headers"].items() if k.lower() not in _HOP}
        try:
            data = json.loads(content)
            return JSONResponse(content=data, status_code=result["status_code"], headers=headers)
        except Exception:
            media = headers.get("content-type", "")
            return Response(
                content, status_code=result["status_code"], headers=headers, media_type=media
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "session_server_instance_id": instance_id}

    @app.post("/sessions")
    async def create_session(request: Request) -> Any:
        body = await request.body()
        wanted = json.loads(body).get("session_id") if body else None
        if wanted is None:
            return {"session_id": registry.mint(ProductionLikeSession())}
        outcome = registry.create(wanted, ProductionLikeSession())
        if outcome is DELETED:
            return _error(404, f"session not found: session_id={wanted}")
        if outcome == LIVE:
            return _error(409, f"session already exists: session_id={wanted}")
        return {"session_id": wanted}

    @app.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> Any:
        session = registry.lookup(session_id)
        if session is DELETED:
            raise SessionNotFound(session_id)
        if session is NEVER_SEEN:
            # Never seen (e.g. after a restart): empty answer, nothing created.
            return GetSessionResponse(session_id=session_id, records=[], metadata={})
        ids = session.trajectory_token_ids
        metadata = {
            "accumulated_token_ids": ids[-1] if ids else [],
            "num_assistant": session.num_assistant,
        }
        return GetSessionResponse(session_id=session_id, records=session.records, metadata=metadata)

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> Response:
        session = registry.lookup(session_id)
        if session is DELETED or session is NEVER_SEEN or session.closing:
            raise SessionNotFound(session_id)
        session.closing = True
        await session.lock.acquire()
        try:
            registry.remove(session_id)
        finally:
            session.lock.release()
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/v1/chat/completions")
    async def chat_completions(request: Request, session_id: str) -> Response:
        session = registry.get_or_create(session_id, ProductionLikeSession)
        if session is DELETED or session.closing:
            raise SessionNotFound(session_id)

        # Phase 1, under the session lock: parse, force flags, check history.
        async with session.lock:
            if session.closing:
                raise SessionNotFound(session_id)
            body = await request.body()
            try:
                request_body = json.loads(body) if body else {}
            except json.JSONDecodeError as e:
                return _error(400, f"invalid JSON body: {e}")
            request_body["logprobs"] = True
            request_body["return_prompt_token_ids"] = True
            request_body["return_meta_info"] = True
            request_body["no_stop_trim"] = False
            request_messages = request_body.get("messages", [])
            try:
                _prepare(session, request_messages)
            except ValueError as e:
                return _error(400, str(e))
            body = json.dumps(request_body).encode()
            expected_num_assistant = session.num_assistant

        # Phase 2, no lock: the upstream call.
        result = await do_proxy(request, "v1/chat/completions", body=body)
        if result["status_code"] != 200:
            return build_proxy_response(result)

        response = json.loads(result["response_body"])
        choice = response.get("choices", [{}])[0]
        meta_info = choice.get("meta_info")
        if not isinstance(meta_info, dict) or "output_token_logprobs" not in meta_info:
            return _error(502, "meta_info and output_token_logprobs must be in choice")
        assistant_message = choice.get("message", {})
        if assistant_message.get("content") is None:
            return _error(502, "assistant message content is None")
        output_token_logprobs = meta_info["output_token_logprobs"]
        if len(output_token_logprobs) != meta_info.get("completion_tokens"):
            return _error(502, "len(output_token_logprobs) != completion_tokens")
        completion_ids = [t[1] for t in output_token_logprobs]
        prompt_ids = choice.get("prompt_token_ids") or []

        # Phase 3, under the lock: record unless deleted or overtaken meanwhile.
        async with session.lock:
            if session.closing or session.num_assistant != expected_num_assistant:
                return build_proxy_response(result)
            all_ids = prompt_ids + completion_ids
            prev = session.trajectory_token_ids[-1] if session.trajectory_token_ids else []
            if prev and all_ids[: len(prev)] != prev:
                return _error(500, "pretokenized prefix mismatch")
            session.messages = [*request_messages, assistant_message]
            session.trajectory_token_ids.append(all_ids)
            session.checkpoint_message_ends.append(len(request_messages) + 1)
            session.num_assistant = len(session.checkpoint_message_ends)
            session.records.append(
                SessionRecord(
                    timestamp=time.time(),
                    method=request.method,
                    path="/v1/chat/completions",
                    status_code=result["status_code"],
                    request=request_body,
                    response=response,
                )
            )
        return build_proxy_response(result)

    @app.api_route(
        "/sessions/{session_id}/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"]
    )
    async def session_proxy(request: Request, session_id: str, path: str) -> Response:
        return build_proxy_response(await do_proxy(request, path))

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FastAPI reference session server (production PR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--upstream", default=None, help="OpenAI-compatible backend base URL")
    p.add_argument("--tombstone-capacity", type=int, default=PRODUCTION_TOMBSTONE_CAPACITY)
    p.add_argument("--session-ttl-s", type=float, default=PRODUCTION_SESSION_TTL_S)
    p.add_argument("--log-level", default="warning")
    p.add_argument(
        "--upstream-pool",
        type=int,
        default=0,
        help="upstream connections (max and keep-alive); 0: httpx defaults (100, 20 kept alive)",
    )
    p.add_argument(
        "--client",
        choices=["httpx", "httpx2"],
        default="httpx",
        help="upstream client library (production: httpx)",
    )
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the reference server binds loopback only")
    app = build_app(
        a.upstream.rstrip("/") if a.upstream else None,
        a.tombstone_capacity,
        a.session_ttl_s,
        pool=a.upstream_pool or None,
        client_lib=a.client,
    )
    uvicorn.run(
        app,
        host=a.host,
        port=a.port,
        log_level=a.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
