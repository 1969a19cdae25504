"""The same app under an ASGI server (uvicorn), as ``app_from_env`` offers it.

``serve`` hands handlers a complete body; under ASGI ``read_body`` receives
it message by message and enforces the limit itself. This is that path, over
real HTTP: split and chunked bodies, both kinds of oversized body, a chat turn.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Raw, ServerProc, clean_env, free_port, request

LIMIT = 1024
CHAT = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def asgi() -> Iterator[ServerProc]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "rollout_sessions.server:app_from_env",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = ServerProc(cmd, clean_env({"ROLLOUT_SESSIONS_MAX_BODY_BYTES": str(LIMIT)}), port)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def raw(asgi: ServerProc, raw_factory: Callable[[str], Raw]) -> Raw:
    return raw_factory(asgi.url)


def test_body_split_across_segments(asgi: ServerProc, raw: Raw) -> None:
    wire = request("POST", "/sessions", b'{"session_id": "asgi-split"}')
    raw.send(wire[:-10])
    time.sleep(0.05)
    raw.send(wire[-10:])
    status, _, body = raw.response()
    assert (status, json.loads(body)) == (200, {"session_id": "asgi-split"})
    assert asgi.get("/sessions/asgi-split").json()["metadata"] == {
        "accumulated_token_ids": [],
        "num_assistant": 0,
    }


def test_chunked_body(asgi: ServerProc, raw: Raw) -> None:
    body = b'{"session_id": "asgi-chunked"}'
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    )
    status, _, answer = raw.response()
    assert (status, json.loads(answer)) == (200, {"session_id": "asgi-chunked"})


def test_chunked_body_over_the_limit_is_413_and_creates_nothing(asgi: ServerProc) -> None:
    payload = b'{"session_id": "asgi-big", "pad": "' + b"x" * (2 * LIMIT) + b'"}'
    resp = asgi.post(
        "/sessions", data=iter([payload[:512], payload[512:]]), headers={"Content-Type": "x"}
    )
    assert resp.status_code == 413
    assert resp.json() == {"error": f"request body exceeds {LIMIT} bytes"}
    assert asgi.get("/sessions/asgi-big").json()["metadata"] == {}


def test_declared_length_over_the_limit_is_413(raw: Raw) -> None:
    raw.send(b"POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
    status, _, body = raw.response()  # answered without a byte of the body
    assert status == 413
    assert json.loads(body) == {"error": f"request body exceeds {LIMIT} bytes"}


def test_chat_turn_is_recorded(asgi: ServerProc) -> None:
    sid = asgi.post("/sessions").json()["session_id"]
    resp = asgi.post(
        f"/sessions/{sid}/v1/chat/completions",
        data=CHAT,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    assert len(asgi.get(f"/sessions/{sid}").json()["records"]) == 1
