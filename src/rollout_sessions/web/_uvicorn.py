"""The one place that reaches into uvicorn's internals (tested in tests/unit/test_adapters.py).

``serve`` runs on uvicorn's httptools protocol: httptools (llhttp) parses,
uvicorn frames, pipelines in order and applies flow control (a client that
does not read its answers stops being read from). What uvicorn lacks is
added here around its protocol, through uvicorn's own hook for a protocol
class (``Config(http=...)``); nothing here parses or frames HTTP:

- **head deadline**: a connection whose request head is not complete
  ``header_timeout_s`` after it opened (or, between requests, after the
  read that brought the first part of the next head) is closed. uvicorn's
  keep-alive timer covers the idle time between requests;
- **head size**: a head still incomplete past ``MAX_HEAD_BYTES`` gets
  uvicorn's 400 answer and the connection ends;
- **connection cap**: past ``max_connections`` open connections a new one is
  closed at once, so clients can never take the file descriptors the
  upstream pool and the journal need;
- ``Expect: 100-continue`` from an HTTP/1.0 client is not answered with an
  interim ``100 Continue`` (HTTP/1.0 has no such thing);
- the 400 uvicorn answers to a request it cannot parse carries the JSON
  error body every other error has, not uvicorn's plain text;
- **one write per answer**: uvicorn writes an answer's head and its body
  with two ``transport.write`` calls, and uvloop sends each at once: two
  syscalls and two TCP segments per answer. ``WriteBatcher`` hands them to
  the transport together (one ``writev``) when the answer is complete, when
  ``BATCH_BYTES`` are waiting, or at the next pass of the event loop,
  whichever comes first (its gain: CHANGELOG.md).

``Server`` is uvicorn's server with two log lines: when it listens and when
a stop begins (``startup`` and ``handle_exit``, the handler uvicorn installs
for SIGINT and SIGTERM while it serves).

uvicorn names used: ``HttpToolsProtocol`` and its ``connections``,
``parser``, ``transport`` (the cycle of each request writes through it),
``loop``, ``on_response_complete``, ``cycle`` (``response_complete``),
``expect_100_continue``, ``send_400_response``, ``server_state.default_headers``,
``STATUS_LINE`` and the parser callbacks; ``Server.startup`` and
``Server.handle_exit``. uvicorn is pinned to one minor version
(docs/internals.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from types import FrameType
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from rollout_sessions.web import errors

log = logging.getLogger("rollout_sessions")

MAX_HEAD_BYTES = 64 * 1024
# Bytes an answer may hold back before they go to the transport anyway, so
# that a long streamed answer meets the transport's flow control as before.
BATCH_BYTES = 64 * 1024


class _NextPass:
    """The batchers still holding bytes, flushed together at the next loop pass:
    one scheduled callback a pass, not one an answer."""

    __slots__ = ("_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the loop is this object's key in `_next_pass`.
        self._loop = weakref.ref(loop)
        self._waiting: list[WriteBatcher] = []

    def add(self, batcher: WriteBatcher) -> None:
        waiting = self._waiting
        waiting.append(batcher)
        loop = self._loop()
        if len(waiting) == 1 and loop is not None:
            loop.call_soon(self._run)

    def _run(self) -> None:
        waiting, self._waiting = self._waiting, []
        for batcher in waiting:
            try:
                batcher.flush()
            except Exception:  # a broken connection must not hold the others' bytes back
                batcher.abort()


_next_pass: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _NextPass] = (
    weakref.WeakKeyDictionary()
)


class WriteBatcher:
    """The transport uvicorn's protocol writes through: writes are held until
    ``flush`` (the answer is complete), until ``BATCH_BYTES`` are held, or
    until the next loop pass, then given to the transport in one call.
    Everything else is the transport's own; closing flushes first."""

    __slots__ = ("_transport", "_next_pass", "_held", "_held_bytes")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        next_pass = _next_pass.get(loop)
        if next_pass is None:
            next_pass = _next_pass[loop] = _NextPass(loop)
        self._next_pass = next_pass
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= BATCH_BYTES:
            self.flush()
        elif len(held) == 1:
            self._next_pass.add(self)

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        self._held_bytes = 0
        if self._transport.is_closing():
            return  # closed, or lost: nobody will read these
        self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._held_bytes = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a head deadline, a head size limit, a
    connection cap (configured by ``guarded_protocol``) and one write per answer."""

    header_timeout_s = 30.0
    max_connections = 1 << 30

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # its flow control keeps the transport itself
        self.transport = WriteBatcher(transport, self.loop)  # type: ignore[assignment]
        if len(self.connections) > self.max_connections:
            transport.abort()  # over the cap: give the descriptor back now
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._in_head or self.parser is None:
            return
        # A head still incomplete after this read: the deadline runs from now
        # (a head that arrives in one read, the usual case, arms no timer).
        if self._head_timer is None:
            self._arm_head_timer()
        if self._head_bytes > MAX_HEAD_BYTES:
            self._cancel_head_timer()
            self.send_400_response(f"request head larger than {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to an unparseable request, as ``{"error": ...}``.

        The same answer uvicorn writes (its status line, its default headers,
        then close), with a JSON body.
        """
        error = errors.malformed_request(msg.rstrip("."))
        body = orjson.dumps({"error": error.message})
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # the answer's head and body, one write
        super().on_response_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._cancel_head_timer()
        if self.parser.get_http_version() == "1.0":
            self.expect_100_continue = False
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head waits behind an answer in progress (reading is
            # paused meanwhile): it is not the client's delay.
            self._arm_head_timer()
            return
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn as ``Config(http=...)``."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )


class Server(uvicorn.Server):
    """uvicorn's server that says when it listens and when a stop begins.

    ``startup`` is uvicorn's step that binds the sockets (after the app's own
    start-up); ``handle_exit`` is the handler uvicorn installs for SIGINT and
    SIGTERM while it serves. Both are overridden only to log.
    """

    def __init__(self, config: uvicorn.Config, graceful_s: float) -> None:
        super().__init__(config)
        self.graceful_s = graceful_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            config = self.config
            log.info("listening on http://%s:%d", config.host, config.port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info(
                "stopping: no new connections; requests in flight finish (at most %ds)",
                self.graceful_s,
            )
        super().handle_exit(sig, frame)
