"""The HTTP/1.1 layer (``rollout_sessions.http1``) over raw sockets.

What an ordinary client library never shows: pipelined requests answered in
order (also behind a request that waits on the upstream), chunked request
bodies, ``Expect: 100-continue``, HEAD, HTTP/1.0, half-closed clients, and
the answers that end a connection (400, 413, 431).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from blacksheep import Application, Content, Request, Response, Router
from blacksheep.contents import StreamedContent
from conftest import Raw, ServerProc, request, start_server

from rollout_sessions import http1

CHAT = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
LIMIT = 1024


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    proc = start_server("--max-body-bytes", str(LIMIT))
    yield proc
    proc.cleanup()


@pytest.fixture
def raw(srv: ServerProc, raw_factory: Callable[[str], Raw]) -> Raw:
    return raw_factory(srv.url)


def mint(srv: ServerProc) -> str:
    return srv.post("/sessions").json()["session_id"]


def test_pipelined_requests_are_answered_in_order(srv: ServerProc, raw: Raw) -> None:
    sid = mint(srv)
    raw.send(
        request("GET", f"/sessions/{sid}")
        + request("POST", "/sessions", b'{"session_id": "pipelined-1"}')
        + request("DELETE", f"/sessions/{sid}")
        + request("GET", f"/sessions/{sid}")
    )
    answers = [raw.response() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 204, 404]
    assert json.loads(answers[0][2])["session_id"] == sid
    assert json.loads(answers[1][2]) == {"session_id": "pipelined-1"}
    assert json.loads(answers[3][2]) == {"error": f"session not found: session_id={sid}"}


def test_pipelined_behind_suspended_chat_turns(srv: ServerProc, raw: Raw) -> None:
    # Each chat turn waits on the upstream (in a task); what is queued behind
    # must not overtake it, even when it could be answered at once.
    first, second = mint(srv), mint(srv)
    raw.send(
        request("POST", f"/sessions/{first}/v1/chat/completions", CHAT)
        + request("POST", f"/sessions/{second}/v1/chat/completions", CHAT)
        + request("GET", f"/sessions/{second}")
        + request("GET", "/health")
    )
    for _ in range(2):
        status, _, body = raw.response()
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    status, _, body = raw.response()
    assert status == 200
    assert len(json.loads(body)["records"]) == 1  # answered after the turn it follows
    status, _, body = raw.response()
    assert (status, json.loads(body)["status"]) == (200, "ok")


def test_chunked_request_body(srv: ServerProc, raw: Raw) -> None:
    body = b'{"session_id": "chunked-body-1"}'
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
        + b"%x\r\n%s\r\n" % (10, body[:10])
        + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:])
        + b"0\r\n\r\n"
    )
    status, _, answer = raw.response()
    assert (status, json.loads(answer)) == (200, {"session_id": "chunked-body-1"})
    assert srv.get("/sessions/chunked-body-1").status_code == 200


def test_chunked_body_over_the_limit_is_413_and_creates_nothing(srv: ServerProc, raw: Raw) -> None:
    payload = b'{"session_id": "chunked-big", "pad": "' + b"x" * (2 * LIMIT) + b'"}'
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 256]), payload[i : i + 256])
            for i in range(0, len(payload), 256)
        )
        + b"0\r\n\r\n"
    )
    status, headers, body = raw.response()
    assert status == 413
    assert json.loads(body) == {"error": f"request body exceeds {LIMIT} bytes"}
    assert headers[b"connection"] == b"close"
    assert raw.closed_by_server()
    # Never seen: GET reads empty, i.e. nothing was created.
    assert srv.get("/sessions/chunked-big").json()["metadata"] == {}


def test_declared_length_over_the_limit_is_answered_before_the_body(raw: Raw) -> None:
    raw.send(b"POST /sessions HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
    status, headers, body = raw.response()  # no body byte was sent
    assert status == 413
    assert headers[b"connection"] == b"close"
    assert raw.closed_by_server()


def test_expect_100_continue(raw: Raw) -> None:
    body = b'{"session_id": "expect-continue-1"}'
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    status, _, _ = raw.response(head=True)
    assert status == 100
    raw.send(body)
    status, _, answer = raw.response()
    assert (status, json.loads(answer)) == (200, {"session_id": "expect-continue-1"})


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nContent-Length: nope\r\n\r\n"],
)
def test_malformed_request_is_400_and_ends_the_connection(raw: Raw, garbage: bytes) -> None:
    raw.send(garbage)
    status, headers, body = raw.response()
    assert status == 400
    assert json.loads(body)["error"].startswith("malformed HTTP request: ")
    assert headers[b"connection"] == b"close"
    assert raw.closed_by_server()


def test_headers_over_the_limit_are_431(raw: Raw) -> None:
    raw.send(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, body = raw.response()
    assert status == 431
    assert json.loads(body) == {"error": "request headers exceed 65536 bytes"}
    assert raw.closed_by_server()


def test_unfinished_header_is_cut_off_at_the_limit(srv: ServerProc, raw: Raw) -> None:
    # A header value that never ends: the parser would buffer it forever.
    raw.send(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Endless: ")
    for _ in range(4):
        time.sleep(0.05)
        with contextlib.suppress(OSError):  # the answer may already have come
            raw.send(b"a" * 30_000)
    status, _, body = raw.response()
    assert status == 431
    assert json.loads(body) == {"error": "request headers exceed 65536 bytes"}
    assert raw.closed_by_server()


def test_split_head_followed_by_a_large_body_is_not_a_large_head(
    server: ServerProc, raw_factory: Callable[[str], Raw]
) -> None:
    conn = raw_factory(server.url)
    body = json.dumps({"session_id": "split-head-big-body", "pad": "x" * 200_000}).encode()
    wire = request("POST", "/sessions", body)
    conn.send(wire[:20])
    time.sleep(0.05)
    conn.send(wire[20:])  # the head's rest and 200 kB of body, in one write
    status, _, answer = conn.response()
    assert (status, json.loads(answer)) == (200, {"session_id": "split-head-big-body"})


def test_head_answer_has_no_body(srv: ServerProc, raw: Raw) -> None:
    raw.send(request("HEAD", "/health") + request("GET", "/health"))
    status, headers, _ = raw.response(head=True)
    assert int(headers[b"content-length"]) > 0  # what a GET would carry
    status, _, body = raw.response()  # parses only if HEAD sent no body
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_http10_and_connection_close_end_the_connection(srv: ServerProc) -> None:
    for first_line, extra in [
        ("GET /health HTTP/1.0", ""),
        ("GET /health HTTP/1.1", "Connection: close\r\n"),
    ]:
        conn = Raw(srv.url)
        try:
            conn.send(f"{first_line}\r\nHost: test\r\n{extra}\r\n".encode())
            status, headers, _ = conn.response()
            assert status == 200
            assert headers[b"connection"] == b"close"
            assert conn.closed_by_server()
        finally:
            conn.close()


def test_half_closed_client_still_gets_its_answer(server_factory, echo_factory) -> None:
    slow = server_factory("--upstream", echo_factory(latency_ms=300).url)
    conn = Raw(slow.url)
    try:
        conn.send(request("POST", f"/sessions/{mint(slow)}/v1/chat/completions", CHAT))
        conn.sock.shutdown(socket.SHUT_WR)  # "that was all", while the turn waits upstream
        status, _, body = conn.response()
        assert status == 200, body
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_client_gone_mid_turn_leaves_the_server_healthy(srv: ServerProc) -> None:
    sid = mint(srv)
    for _ in range(5):
        conn = Raw(srv.url)
        conn.send(request("POST", f"/sessions/{sid}/v1/chat/completions", CHAT))
        conn.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        conn.close()  # reset, before the answer
    deadline = time.monotonic() + 5
    while srv.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.get("/health").status_code == 200
    assert srv.get(f"/sessions/{sid}").status_code == 200


def test_idle_keep_alive_connections_do_not_delay_shutdown() -> None:
    proc = start_server()
    try:
        idle = [Raw(proc.url) for _ in range(3)]
        for conn in idle:
            conn.send(request("GET", "/health"))
            assert conn.response()[0] == 200
        started = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - started < 5
        assert all(conn.closed_by_server(timeout=1) for conn in idle)
    finally:
        proc.cleanup()


# --- in-process: a small app of our own, for what no route of the server does --------


HITS: list[str] = []  # paths the in-process app's handlers ran for


def _streaming_app() -> Application:
    app = Application(router=Router())

    async def parts() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"bb"

    async def broken_parts() -> AsyncIterator[bytes]:
        yield b"a"
        raise RuntimeError("the producer failed")

    async def stream(request: Request) -> Response:
        return Response(200, None, StreamedContent(b"text/plain", parts))

    async def broken(request: Request) -> Response:
        return Response(200, None, StreamedContent(b"text/plain", broken_parts))

    async def plain(request: Request) -> Response:
        HITS.append(request.path)
        return Response(200, None, Content(b"text/plain", b"plain"))

    app.router.add_get("/stream", stream)
    app.router.add_get("/plain", plain)
    app.router.add_get("/broken", broken)
    return app


def exchange(raw: bytes, until: bytes | None = None) -> bytes:
    """Send ``raw`` to the app served by ``http1.Http1Server``; read up to
    ``until`` (or until the server closes)."""

    async def run() -> bytes:
        app = _streaming_app()
        await app.start()
        listener = await asyncio.get_running_loop().create_server(
            http1.Http1Server(app, LIMIT), "127.0.0.1", 0
        )
        try:
            port = listener.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            if until:
                data = await asyncio.wait_for(reader.readuntil(until), 5)
            else:  # to the close (or the reset)
                data = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await asyncio.wait_for(reader.read(65536), 5):
                        data += chunk
            writer.close()
            return data
        finally:
            listener.close()
            await app.stop()

    return asyncio.run(run())


def test_streamed_body_is_chunked_on_a_kept_connection() -> None:
    out = exchange(request("GET", "/stream") + request("GET", "/plain"), until=b"\r\n\r\nplain")
    first, second = out.split(b"0\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in first
    assert first.endswith(b"\r\n\r\n1\r\na\r\n2\r\nbb\r\n")
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")  # the connection stayed usable


def test_streamed_body_to_http10_runs_to_the_close() -> None:
    out = exchange(b"GET /stream HTTP/1.0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert body == b"abb"


def test_streamed_body_failing_midway_cuts_the_connection() -> None:
    out = exchange(request("GET", "/broken") + request("GET", "/plain"))
    assert out.endswith(b"\r\n\r\n1\r\na\r\n")  # no terminating chunk: visibly broken
    assert b"plain" not in out.split(b"\r\n\r\n", 1)[1]


def test_requests_pipelined_after_connection_close_are_not_run() -> None:
    HITS.clear()
    out = exchange(
        request("GET", "/plain", None, "Connection: close") + request("GET", "/plain?again")
    )
    assert out.count(b"HTTP/1.1 ") == 1
    assert out.endswith(b"plain")
    assert HITS == ["/plain"]  # the handler never ran for the second request
