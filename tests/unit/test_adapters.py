"""The three modules that use a library's internals, each tested on its own, in
process: if an upgrade of BlackSheep, aiohttp or uvicorn moves a name they
rely on, these fail first and say which."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest
import uvicorn
from blacksheep import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rollout_sessions._aiohttp import StrictResponseHandler, strict_connector
from rollout_sessions._blacksheep import (
    SLICE_BYTES,
    all_routes,
    document_without_binders,
    raw_path,
    whole,
)
from rollout_sessions._uvicorn import BATCH_BYTES, GuardedHttpToolsProtocol, guarded_protocol

# --- BlackSheep --------------------------------------------------------------------------


def test_raw_path_is_the_undecoded_target_path():
    request = Request.incoming("GET", b"/sessions/a%2Fb/x", b"q=1", [])
    assert raw_path(request) == b"/sessions/a%2Fb/x"


def test_document_without_binders_sets_an_empty_binder_list():
    async def handler(request: Request) -> None: ...

    document_without_binders(handler)
    assert handler.binders == []  # type: ignore[attr-defined]


def test_all_routes_sees_routes_before_and_after_they_are_applied():
    from blacksheep import Router

    async def a(request: Request) -> None: ...

    async def b(request: Request) -> None: ...

    router = Router()
    router.add_get("/a", a)
    assert [r.handler for r in all_routes(router)] == [a]
    router.apply_routes()
    router.add_get("/b", b)
    assert {r.handler for r in all_routes(router)} == {a, b}


def _sent(content: Any) -> list[dict]:
    from blacksheep import Response
    from blacksheep.scribe import send_asgi_response

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    asyncio.run(send_asgi_response(Response(200, None, content), send))
    return messages


@pytest.mark.parametrize("size", [SLICE_BYTES, SLICE_BYTES + 1, 120_000])
def test_whole_sends_a_body_in_one_message_with_its_length(size: int):
    from blacksheep import Content

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    start, *rest = _sent(whole(b"application/json", body))
    assert (b"content-length", str(size).encode()) in start["headers"]
    assert b"".join(m["body"] for m in rest) == body
    assert [m["body"] for m in rest if m["body"]] == [body]  # one piece
    # Why: BlackSheep slices a plain Content past SLICE_BYTES.
    plain = [m["body"] for m in _sent(Content(b"application/json", body))[1:] if m["body"]]
    assert len(plain) == (1 if size <= SLICE_BYTES else -(-size // SLICE_BYTES))


# --- aiohttp -----------------------------------------------------------------------------


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class _Stray(asyncio.Protocol):
    """Answers each request with its number, then a stray answer 0.1 s later."""

    count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            _Stray.count += 1
            self.transport.write(_answer(b"%d" % _Stray.count))
            asyncio.get_running_loop().call_later(0.1, self.transport.write, _answer(b"stray"))


def test_a_pooled_connection_that_receives_unasked_bytes_is_never_reused():
    async def main() -> list[bytes]:
        server = await asyncio.get_running_loop().create_server(_Stray, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        got = []
        connector = strict_connector(limit=1)
        assert connector._factory().__class__ is StrictResponseHandler
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    got.append(await resp.read())
                await asyncio.sleep(0.3)
        server.close()
        return got

    assert asyncio.run(main()) == [b"1", b"2", b"3"]


class _Plain(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(_answer(b"x" * 100_000))


def test_a_well_behaved_connection_is_reused():
    async def main() -> int:
        server = await asyncio.get_running_loop().create_server(_Plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        made = 0

        async def count(*_: Any) -> None:
            nonlocal made
            made += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(count)
        async with aiohttp.ClientSession(connector=strict_connector(), trace_configs=[trace]) as s:
            for _ in range(5):
                async with s.get(f"http://127.0.0.1:{port}/") as resp:
                    assert len(await resp.read()) == 100_000
        server.close()
        return made

    assert asyncio.run(main()) == 1


# --- uvicorn -----------------------------------------------------------------------------


async def _app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _run_uvicorn(protocol: type, check: Any, app: Any = _app) -> Any:
    async def main() -> Any:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = uvicorn.Config(
            app, port=port, http=protocol, lifespan="off", log_config=None, access_log=False
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await check(port)
        finally:
            server.should_exit = True
            await task

    return asyncio.run(main())


async def _read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(), True
    except TimeoutError:
        return b"", False


def test_silent_connection_is_closed_at_the_head_deadline():
    async def check(port: int) -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, closed = await _read_until_closed(reader, 2.0)
        writer.close()
        return closed, loop.time() - started

    closed, elapsed = _run_uvicorn(guarded_protocol(0.3, 100), check)
    assert closed and 0.25 <= elapsed < 1.5


def test_http10_expect_gets_no_interim_answer():
    async def check(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
        data, _ = await _read_until_closed(reader, 2.0)
        writer.close()
        return data

    data = _run_uvicorn(GuardedHttpToolsProtocol, check)
    assert data.startswith(b"HTTP/1.1 200") and b"100 Continue" not in data


def test_connections_past_the_cap_are_closed_at_once():
    async def check(port: int) -> list[bool]:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        closed = []
        for reader, writer in conns:
            _, was_closed = await _read_until_closed(reader, 0.3)
            closed.append(was_closed)
            writer.close()
        return closed

    assert _run_uvicorn(guarded_protocol(30.0, 2), check) == [False, False, True, True]


@pytest.mark.parametrize("size", [70 * 1024])
def test_a_head_over_the_limit_is_refused(size: int):
    async def check(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * size)
        data, _ = await _read_until_closed(reader, 2.0)
        writer.close()
        return data

    assert _run_uvicorn(GuardedHttpToolsProtocol, check).startswith(b"HTTP/1.1 400")


class _CountedTransport:
    """A transport that records each call that hands it bytes."""

    def __init__(self, transport: asyncio.Transport, calls: list[list[bytes]]) -> None:
        self._transport = transport
        self._calls = calls

    def write(self, data: bytes) -> None:
        self._calls.append([bytes(data)])
        self._transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        self._calls.append([bytes(d) for d in data])
        self._transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _counting(base: type, calls: list[list[bytes]]) -> type:
    class Counting(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(_CountedTransport(transport, calls))

    return Counting


async def _get(port: int, target: bytes = b"/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data, _ = await _read_until_closed(reader, 5.0)
    writer.close()
    return data


async def _answers(scope: dict, receive: Any, send: Any) -> None:
    """``/``: ``ok`` with its length; ``/long``: 1 MiB in 16 KiB pieces, chunked;
    ``/slow``: the head, 0.3 s, then the body."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"late"})
        return
    for i in range(64):
        await send({"type": "http.response.body", "body": bytes([i]) * 16384, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("batched", [True, False])
def test_an_answer_goes_to_the_transport_in_one_call(batched: bool):
    calls: list[list[bytes]] = []
    base = GuardedHttpToolsProtocol if batched else HttpToolsProtocol
    data = _run_uvicorn(_counting(base, calls), _get, _answers)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nok")
    if batched:
        assert len(calls) == 1 and calls[0][-1] == b"ok"  # the head and the body together
    else:
        assert len(calls) == 2  # uvicorn alone: the head, then the body


def test_a_long_answer_reaches_the_transport_in_pieces_of_the_batch_size():
    calls: list[list[bytes]] = []
    protocol = _counting(GuardedHttpToolsProtocol, calls)
    data = _run_uvicorn(protocol, lambda port: _get(port, b"/long"), _answers)
    body = data.split(b"\r\n\r\n", 1)[1]
    expected = b"".join(b"4000\r\n" + bytes([i]) * 16384 + b"\r\n" for i in range(64))
    assert body == expected + b"0\r\n\r\n"
    # Never much more than a batch held back, so the transport's flow control
    # sees a long answer as it is written.
    sizes = [sum(map(len, call)) for call in calls]
    assert len(calls) >= 64 * 16384 // (BATCH_BYTES + 16384)
    assert max(sizes) < BATCH_BYTES + 16384 + 64


def test_a_head_whose_body_is_late_is_sent_at_once():
    async def check(port: int) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(0.2):  # before the body is sent
            head = await reader.readuntil(b"\r\n\r\n")
        rest, _ = await _read_until_closed(reader, 2.0)
        writer.close()
        return head, rest

    head, rest = _run_uvicorn(GuardedHttpToolsProtocol, check, _answers)
    assert head.startswith(b"HTTP/1.1 200") and rest == b"4\r\nlate\r\n0\r\n\r\n"


class _FakeTransport:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[bytes] = []
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("broken")
        self.sent.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def abort(self) -> None:
        self.aborted = True


def test_a_connection_that_fails_to_write_does_not_hold_the_others_back():
    from rollout_sessions._uvicorn import WriteBatcher

    async def main() -> tuple[_FakeTransport, _FakeTransport]:
        loop = asyncio.get_running_loop()
        broken, fine = _FakeTransport(fail=True), _FakeTransport()
        WriteBatcher(broken, loop).write(b"head")  # type: ignore[arg-type]
        WriteBatcher(fine, loop).write(b"head")  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the next loop pass
        await asyncio.sleep(0)
        return broken, fine

    broken, fine = asyncio.run(main())
    assert broken.aborted and fine.sent == [b"head"]
