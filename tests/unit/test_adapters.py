"""The library behaviour our adapters (_blacksheep.py, _aiohttp.py, _uvicorn.py
and the router in routing.py) rely on, one test or more per internal use
(docs/internals.md lists them): each drives the library itself, so an upgrade
that changes what the library does with a name we use fails here, not in
production.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any

import aiohttp
import orjson
import pytest
import uvicorn
from blacksheep import Application, Content, Request, Response, Router
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rollout_sessions.upstream._aiohttp import StrictResponseHandler, strict_connector
from rollout_sessions.web._blacksheep import (
    SLICE_BYTES,
    all_routes,
    document_without_binders,
    raw_path,
    whole,
)
from rollout_sessions.web._uvicorn import (
    BATCH_BYTES,
    GuardedHttpToolsProtocol,
    Server,
    guarded_protocol,
)

# --- BlackSheep --------------------------------------------------------------------------


def _asgi_scope(raw_path: bytes, method: str = "GET") -> dict:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": b"q=1",
        "root_path": "",
        "headers": [(b"host", b"t")],
    }


def test_raw_path_is_the_undecoded_target_path_the_router_matches():
    # `Request._path`: what BlackSheep's application builds from the ASGI
    # `raw_path` and what its own router matches on (a route value comes out
    # decoded, the path it was matched in not).
    async def handler(request: Request) -> None: ...

    app = Application(router=Router())
    app.router.add_get("/sessions/{id}/x", handler)
    app.router.apply_routes()
    request = app.instantiate_request(_asgi_scope(b"/sessions/a%2Fb/x"), None)
    assert raw_path(request) == b"/sessions/a%2Fb/x"
    assert raw_path(request) == request.url.path  # the public, slower, stricter spelling
    match = app.router.get_match(request)
    assert match is not None and match.handler is handler
    assert match.values == {"id": "a/b"}


def _documented_parameters(without_binders: bool) -> Any:
    from blacksheep.server.openapi.v3 import OpenAPIHandler
    from openapidocs.v3 import Info

    from rollout_sessions.web.openapi import ID_PARAM

    app = Application(router=Router())
    docs = OpenAPIHandler(info=Info(title="t", version="1"))
    docs.bind_app(app)

    async def handler(request: Request) -> Response:
        return Response(204)

    handler.__annotations__ = {"request": Request, "return": Response}
    docs(parameters=ID_PARAM)(handler)
    if without_binders:
        document_without_binders(handler)
    app.router.add_get("/sessions/{id}", handler)
    asyncio.run(app.start())
    return docs.generate_documentation(app).paths["/sessions/{id}"].get.parameters


def test_a_handler_without_binders_gets_its_parameters_documented():
    # BlackSheep calls a handler that takes the bare request as it is (no
    # binders) and then documents none of its parameters; an empty binder
    # list is what makes it document those given to `docs(parameters=...)`.
    assert _documented_parameters(without_binders=False) is None
    (param,) = _documented_parameters(without_binders=True)
    assert (param.name, param.in_.value, param.required) == ("id", "path", True)


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


async def _call(app: Application, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_the_application_routes_every_request_through_router_get_match():
    # SessionRouter overrides `Router.get_match`, the one call BlackSheep's
    # application makes to route a request; `Route.match_by_path` decodes a
    # value as the stock router does; the stock fallback's pattern is `*`.
    from rollout_sessions.web.routing import FALLBACK_PATTERN, SessionRouter

    seen: list[bytes] = []

    class Watching(SessionRouter):
        def get_match(self, request: Request) -> Any:
            seen.append(raw_path(request))
            return super().get_match(request)

    async def by_id(request: Request) -> Response:
        return Response(200, None, Content(b"text/plain", request.route_values["id"].encode()))

    async def missing(request: Request) -> Response:
        return Response(404, None, None)

    router = Watching()
    router.add_by_id("GET", by_id)
    router.fallback = missing
    app = Application(router=router)

    async def main() -> tuple[list[dict], list[dict]]:
        await app.start()
        return (
            await _call(app, _asgi_scope(b"/sessions/a%3Ab")),
            await _call(app, _asgi_scope(b"/nowhere")),
        )

    found, lost = asyncio.run(main())
    assert seen == [b"/sessions/a%3Ab", b"/nowhere"]
    assert (found[0]["status"], found[1]["body"]) == (200, b"a:b")
    assert lost[0]["status"] == 404
    fallback = router.get_match(app.instantiate_request(_asgi_scope(b"/nowhere"), None))
    assert fallback is not None and fallback.pattern == FALLBACK_PATTERN


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
        made: list[Counted] = []

        class Counted(StrictResponseHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                made.append(self)

        async with aiohttp.ClientSession(connector=strict_connector(Counted, limit=1)) as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    got.append(await resp.read())
                await asyncio.sleep(0.3)
        server.close()
        # Every connection came from the protocol factory we set, and each one
        # was closed when its stray answer arrived: three requests, three.
        assert len(made) == 3
        return got

    assert asyncio.run(main()) == [b"1", b"2", b"3"]


class _Interim(asyncio.Protocol):
    """Answers each request with ``103``, ``100`` and ``102``, each in its own
    write 20 ms apart, then the answer."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        for status in (b"103 Early Hints\r\nLink: </a>; rel=preload", b"100 Continue", b"102 X"):
            self.transport.write(b"HTTP/1.1 " + status + b"\r\n\r\n")
            await asyncio.sleep(0.02)
        self.transport.write(_answer(b"final"))


def test_aiohttp_feeds_interim_answers_through_the_hooks_and_skips_them():
    # What StrictResponseHandler relies on: aiohttp calls set_response_params
    # once per request before sending it, then feed_data once per parsed
    # answer, (message, body stream), interim (1xx) answers included, which
    # ClientResponse itself skips.
    calls: list[Any] = []

    class Recording(StrictResponseHandler):
        def set_response_params(self, **kwargs: Any) -> None:
            calls.append("params")
            super().set_response_params(**kwargs)

        def feed_data(self, data: Any, size: int = 0) -> None:
            code = data[0].code
            # An interim answer's body stream is complete when it is fed.
            calls.append((code, data[1].is_eof()) if code < 200 else code)
            super().feed_data(data, size)

    async def main() -> tuple[list[bytes], int]:
        server = await asyncio.get_running_loop().create_server(_Interim, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        made = 0

        async def count(*_: Any) -> None:
            nonlocal made
            made += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(count)
        connector = strict_connector(Recording, limit=1)
        got = []
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            for _ in range(2):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    assert resp.status == 200
                    got.append(await resp.read())
        server.close()
        return got, made

    got, made = asyncio.run(main())
    assert got == [b"final", b"final"] and made == 1  # answered, and the connection reused
    interim = [(103, True), (100, True), (102, True)]
    assert calls == ["params", *interim, 200] * 2


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
    from rollout_sessions.web._uvicorn import WriteBatcher

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


def test_an_unparseable_request_gets_our_json_400():
    # uvicorn answers a request httptools cannot parse through
    # `send_400_response`, which GuardedHttpToolsProtocol overrides.
    async def check(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost t\r\n\r\n")  # a header line without a colon
        data, _ = await _read_until_closed(reader, 2.0)
        writer.close()
        return data

    data = _run_uvicorn(GuardedHttpToolsProtocol, check)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert list(orjson.loads(body)) == ["error"]


def test_a_stop_signal_reaches_handle_exit_then_the_handler_installed_before(caplog):
    # What `serve` relies on: while uvicorn serves, its `handle_exit` (ours
    # logs) is the SIGTERM handler; after the graceful stop uvicorn restores
    # the handler that was installed before and delivers the signal to it
    # (the default one would end the process with -SIGTERM).
    received: list[int] = []
    installed: list[Any] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = uvicorn.Config(_app, port=port, lifespan="off", log_config=None)
        server = Server(config, 5)

        async def main() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            installed.append(signal.getsignal(signal.SIGTERM))
            signal.raise_signal(signal.SIGTERM)
            await task

        with caplog.at_level(logging.INFO, logger="rollout_sessions"):
            asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert installed == [server.handle_exit]
    assert received == [signal.SIGTERM]
    messages = [r.getMessage() for r in caplog.records if r.name == "rollout_sessions"]
    assert messages == [
        f"listening on http://127.0.0.1:{port}",
        "stopping: no new connections; requests in flight finish (at most 5s)",
    ]


def test_a_stop_signal_before_uvicorn_takes_over_stops_it_gracefully():
    # `serve`'s own handler is in place from just before `Server.run`; a stop
    # signal that lands before uvicorn installs its handler sets uvicorn's
    # `should_exit`, which uvicorn honours right after start-up.
    from rollout_sessions.web.server import stop_handler

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(uvicorn.Config(_app, port=port, lifespan="off", log_config=None), 5)
    stop = stop_handler(server)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        signal.raise_signal(signal.SIGTERM)
        assert server.should_exit
        server.run()  # starts, stops at once, and the re-delivered signal ends nothing
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert server.started
