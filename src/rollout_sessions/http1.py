"""HTTP/1.1 on uvloop and httptools, serving the BlackSheep app without ASGI.

Why our own protocol instead of an ASGI server: in the lifecycle benchmark
(benchmarks/RESULTS.md, "HTTP server choice") it serves 1.5-2.2x the
requests per second of granian and of uvicorn + httptools on the same app,
at lower p99 and about half their CPU per request. Three things make the
difference:

- One thread. The request is parsed, handled and answered on the event loop
  that owns the connection: no hand-off to another thread, no GIL ping-pong.
- No ASGI layer. Requests are built straight from the parser's callbacks and
  given to ``Application.handle``; no scope dict, no receive/send messages.
- No task for a handler that never suspends. The handler coroutine is first
  stepped inline; every lifecycle route finishes in that step, so its answer
  is written from ``data_received``. A handler that does suspend (a chat
  turn waiting on the upstream) is finished by a task. So a handler's first
  step runs outside any task (``asyncio.current_task()`` is None, as in no
  ASGI server): code that needs a task around it (aiohttp's timeouts,
  ``asyncio.timeout``) is awaited through ``in_task``.

What the protocol does: keep-alive and pipelining (answers go out in request
order), bodies framed by Content-Length or chunked, ``Expect: 100-continue``,
HEAD, HTTP/1.0. Limits: a body over ``max_body_bytes`` is refused with 413
as soon as it is known to be too large (the declared length, or the chunk
that crosses it) and never buffered past the limit; request headers over
``MAX_HEADER_BYTES`` get 431; unparseable input gets 400. Each of those ends
the connection (with a short lingering close, so the client reads the
answer). A client that stops reading its answers stops being read from.

Graceful stop (``Http1Server.shutdown``): stop accepting, close idle
connections, let requests in flight finish within a bound, then close.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import types
from collections.abc import Coroutine, Generator
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, TypeVar

import httptools
from blacksheep import Application, Content, Request, Response

from rollout_sessions import errors
from rollout_sessions.errors import ApiError
from rollout_sessions.httputil import error_response

log = logging.getLogger("rollout_sessions")
T = TypeVar("T")

# Request line plus headers of one request; more is answered 431.
MAX_HEADER_BYTES = 64 * 1024
# Complete requests queued on one connection behind the one being answered
# (pipelining) before we stop reading from it.
MAX_PIPELINED = 32
# After an answer that ends a connection early (413, 431, 400) the client
# may still be sending; reading (and dropping) that for a moment keeps the
# kernel from resetting the connection before the client read the answer.
LINGER_S = 2.0

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_OCTETS = b"application/octet-stream"  # a body's type when none is declared
# Response headers this layer writes itself (and `connection: close` is noted).
_FRAMING = frozenset(
    {b"connection", b"content-length", b"transfer-encoding", b"date", b"keep-alive"}
)


def _date_line() -> bytes:
    return b"date: %s\r\n" % formatdate(usegmt=True).encode()


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], first: Any) -> Generator[Any, Any, Any]:
    """Finish, inside a task, a coroutine we already stepped once by hand.

    ``first`` is what that step yielded (the future it waits on): it becomes
    our own first yield, so the task waits on it and then resumes the
    coroutine, as if the task had taken that step itself. Delegation is by
    hand because BlackSheep's coroutines are Cython's (no ``yield from``).
    """
    pending = first
    while True:
        try:
            sent = yield pending
        except BaseException as exc:  # a cancel: deliver it where the coroutine waits
            step, arg = coro.throw, exc
        else:
            step, arg = coro.send, sent
        try:
            pending = step(arg)
        except StopIteration as stop:
            return stop.value


async def in_task(awaitable: Coroutine[Any, Any, T]) -> T:
    """Await ``awaitable``, in a task of its own if we are not inside one."""
    if asyncio.current_task() is None:
        return await asyncio.ensure_future(awaitable)
    return await awaitable


class Http1Server:
    """The connections of one listening socket, and their graceful stop."""

    def __init__(self, app: Application, max_body_bytes: int) -> None:
        """Create it inside the running loop (it keeps the Date header fresh)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.date = _date_line()  # the Date header, rebuilt every second
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _tick(self) -> None:
        self.date = _date_line()
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)

    def __call__(self) -> Connection:
        """Protocol factory for ``loop.create_server``."""
        return Connection(self)

    async def shutdown(self, timeout: float) -> None:
        """Once the listener is closed: end idle connections at once, busy ones
        after their answers; after ``timeout`` close whatever is left."""
        self.stopping = True
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections or self.tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=min(left, 0.1))
            else:
                await asyncio.sleep(min(left, 0.01))
        for conn in list(self.connections):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        self._clock.cancel()


class Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, close when told to.

    The common case is kept short: a request that arrives with nothing
    queued before it is answered from ``on_message_complete`` directly.
    """

    def __init__(self, server: Http1Server) -> None:
        self.server = server
        self.app = server.app
        self.limit = server.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.scope: dict[str, Any] = {}
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.messages = 0  # requests begun on this connection
        self.in_head = False  # between a request's first byte and its blank line
        self.head_bytes = 0  # of the head, as parsed (exact: the 431 limit)
        self.head_read = 0  # read after the chunk the head began in (bounds buffering)
        self.content_type = _OCTETS
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.refused = False  # a refusal answer is queued: parse nothing more
        # Parsed, not yet started, in order: (request or refusal, keep_alive, head).
        self.queue: collections.deque[tuple[Request | ApiError, bool, bool]] = collections.deque()
        self.busy = False  # a task is finishing the request started last
        self.closing = False  # no more requests: the last answer ends the connection
        self.reading = True
        self.writable = True
        self.linger: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # What BlackSheep reads from an ASGI scope (client_ip, scheme,
        # base_path); one per connection, shared by its requests.
        self.scope = {
            "type": "http",
            "scheme": "http",
            "root_path": "",
            "client": transport.get_extra_info("peername"),
            "server": transport.get_extra_info("sockname"),
        }
        self.server.connections.add(self)
        if self.server.stopping:
            self.close_when_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        if self.linger is not None:
            self.linger.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # after the last request (or lingering): drop what still arrives
        if self.in_head:
            # The parser hands a header over only once it is complete and
            # buffers it until then: bound what it may buffer. Bytes read
            # while one request's head is unfinished all belong to that head.
            room = MAX_HEADER_BYTES - self.head_read
            if len(data) > room:
                message = self.messages
                self._feed(data[:room])
                if self.in_head and self.messages == message:
                    if not self.refused:
                        self._refuse(errors.headers_too_large(MAX_HEADER_BYTES))
                    return
                data = data[room:]
                if self.closing:
                    return
            else:
                self.head_read += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here: the request was answered as plain
            # HTTP; what follows the upgrade is not ours to parse.
            self.close_when_idle()
        except httptools.HttpParserError as exc:
            if not self.refused:  # a refusal stops the parser this way too
                self._refuse(errors.malformed_request(str(exc)))

    def eof_received(self) -> bool | None:
        # The client sent all it will send: answer what it asked, then close.
        self.close_when_idle()
        if self.linger is None and (self.busy or self.queue):
            return True  # keep our side open for the answers still due
        return None  # nothing due: the transport closes

    def pause_writing(self) -> None:
        # A client that does not read its answers gets no more of them made.
        self.writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self.writable = True
        self._update_reading()

    # --- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.content_type = _OCTETS
        self.body = []
        self.body_bytes = 0
        self.messages += 1
        self.in_head = True
        self.head_bytes = 0
        self.head_read = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEADER_BYTES:
            self._refuse_and_stop(errors.headers_too_large(MAX_HEADER_BYTES))

    def on_headers_complete(self) -> None:
        self.in_head = False
        for name, value in self.headers:
            if name == b"content-type":
                self.content_type = value
            elif name == b"content-length":
                if value.isdigit() and int(value) > self.limit:
                    # Refused before a byte of the body is read.
                    self._refuse_and_stop(errors.body_too_large(self.limit))
            elif name == b"expect" and value.lower() == b"100-continue":
                # Only when it cannot overtake an earlier request's answer; a
                # client that hears nothing sends its body after a short wait.
                if not self.busy and not self.queue and self.transport is not None:
                    self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.limit:
            self._refuse_and_stop(errors.body_too_large(self.limit))
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return  # pipelined behind the connection's last request: not answered
        parser = self.parser
        method = parser.get_method()
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse_and_stop(errors.malformed_request("invalid request target"))
        request = Request.incoming(
            _METHODS.get(method) or method.decode("latin-1"),
            url.path,
            url.query or b"",
            self.headers,
        )
        request.scope = self.scope
        if self.body:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            request.content = Content(self.content_type, body)
        # HTTP/1.0 connections close after each answer (no keep-alive dialect).
        keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        if keep_alive and not self.busy and not self.queue:
            self._start(request, True, method == b"HEAD")
        else:
            self._enqueue(request, keep_alive, method == b"HEAD")

    # --- dispatch -------------------------------------------------------------

    def _refuse(self, err: ApiError) -> None:
        """Queue ``err`` as the answer that ends this connection."""
        self.refused = True
        self._enqueue(err, False, False)

    def _refuse_and_stop(self, err: ApiError) -> None:
        """From a parser callback: refuse, and make feed_data stop right here."""
        if not self.refused:
            self._refuse(err)
        raise httptools.HttpParserCallbackError("request refused")

    def _enqueue(self, item: Request | ApiError, keep_alive: bool, head: bool) -> None:
        self.queue.append((item, keep_alive, head))
        if not keep_alive:
            self.closing = True
        if not self.busy:
            self._answer_queued()
        self._update_reading()

    def _answer_queued(self) -> None:
        """Answer queued requests in order until one needs a task."""
        while self.queue and not self.busy and self.transport is not None:
            item, keep_alive, head = self.queue.popleft()
            if isinstance(item, ApiError):
                self._write(error_response(item), False, False, linger=True)
            else:
                self._start(item, keep_alive, head)
        self._update_reading()

    def _start(self, request: Request, keep_alive: bool, head: bool) -> None:
        """Answer ``request`` now if its handler never suspends, else leave a
        task to finish it (and stay busy until then)."""
        coro = self.app.handle(request)
        try:
            first = coro.send(None)
        except StopIteration as stop:
            response = stop.value
            if _streamed(response):
                self._in_task(_ready(response), keep_alive, head)
            else:
                self._write(response, keep_alive, head)
            return
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            self._write(error_response(errors.internal_error()), False, False)
            return
        self._in_task(_resume(coro, first), keep_alive, head)

    def _in_task(self, pending: Any, keep_alive: bool, head: bool) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._finish(pending, keep_alive, head))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _finish(self, pending: Any, keep_alive: bool, head: bool) -> None:
        try:
            response = await pending
            if _streamed(response):
                await self._write_streamed(response, keep_alive, head)
            else:
                self._write(response, keep_alive, head)
        except Exception:
            log.exception("unhandled error in a request handler")
            self._write(error_response(errors.internal_error()), False, False)
        finally:
            self.busy = False
        if self.transport is not None:
            if self.queue:
                self._answer_queued()
            elif self.closing and self.linger is None:
                self._close()

    # --- writing --------------------------------------------------------------

    def _head(self, response: Response, keep_alive: bool) -> tuple[list[bytes], bool]:
        """Status line and headers (without the framing ones), and whether the
        connection stays open after this answer."""
        status = response.status
        lines = [
            _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
            self.server.date,
        ]
        for name, value in response.headers.items():
            key = name.lower()
            if key in _FRAMING:
                if key == b"connection" and value.lower() == b"close":
                    keep_alive = False
                continue
            lines.append(b"%s: %s\r\n" % (name, value))
        if self.closing and not self.queue or self.server.stopping:
            keep_alive = False  # the last answer on this connection
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        return lines, keep_alive

    def _write(
        self, response: Response, keep_alive: bool, head: bool, linger: bool = False
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        lines, keep_alive = self._head(response, keep_alive)
        content = response.content
        status = response.status
        if status in _NO_BODY_STATUS or status < 200:
            lines.append(b"\r\n")
        elif content is None:
            lines.append(b"content-length: 0\r\n\r\n")
        else:
            body = content.body
            lines.append(
                b"content-type: %s\r\ncontent-length: %d\r\n\r\n"
                % (content.type or _OCTETS, len(body))
            )
            if not head:
                lines.append(body)
        transport.write(b"".join(lines))
        if not keep_alive:
            self._end(linger)

    async def _write_streamed(self, response: Response, keep_alive: bool, head: bool) -> None:
        """A body of unknown length: chunked, or up to the close when the
        connection ends with it anyway."""
        transport = self.transport
        if transport is None:
            return
        lines, keep_alive = self._head(response, keep_alive)
        content = response.content
        lines.append(b"content-type: %s\r\n" % (content.type or _OCTETS))
        lines.append(b"transfer-encoding: chunked\r\n\r\n" if keep_alive else b"\r\n")
        transport.write(b"".join(lines))
        if not head:
            try:
                async for chunk in content.get_parts():
                    if transport.is_closing():
                        return
                    if chunk:
                        transport.write(
                            b"%x\r\n%s\r\n" % (len(chunk), chunk) if keep_alive else chunk
                        )
            except Exception:
                # The head is out: no error answer can follow it. Cut the
                # connection so the client sees a broken answer, not a short one.
                log.exception("a streamed answer failed midway")
                self.abort()
                return
            if keep_alive:
                transport.write(b"0\r\n\r\n")
        if not keep_alive:
            self._end(False)

    # --- connection state -----------------------------------------------------

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = self.linger is not None or (self.writable and len(self.queue) < MAX_PIPELINED)
        if want != self.reading:
            self.reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _end(self, linger: bool) -> None:
        """After the final answer. Closing with unread input would reset the
        connection, possibly before the client read the answer; so after a
        refusal we half-close and drop input for a moment first."""
        self.closing = True
        self.queue.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and not self.server.stopping and transport.can_write_eof():
            transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(LINGER_S, self.abort)
            self._update_reading()
        else:
            transport.close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_when_idle(self) -> None:
        """No more requests (graceful stop, EOF, upgrade): end now if nothing
        is in progress, else after the answers due (the last one says
        ``connection: close``)."""
        self.closing = True
        if not self.busy and not self.queue and self.linger is None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _ready(response: Response) -> Response:
    return response


def _streamed(response: Response) -> bool:
    """A body still to be produced (BlackSheep's StreamedContent), not bytes."""
    content = response.content
    return content is not None and content.body is None


async def run(
    app: Application,
    host: str,
    port: int,
    *,
    max_body_bytes: int,
    graceful_s: float,
    bind_wait_s: float = 0.0,
    backlog: int = 4096,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT, then stop gracefully.

    The port is bound before the app starts, so a taken port fails fast (a
    predecessor still closing gets ``bind_wait_s`` to let go of it).
    """
    loop = asyncio.get_running_loop()
    server = Http1Server(app, max_body_bytes)
    deadline = loop.time() + bind_wait_s
    while True:
        try:
            listener = await loop.create_server(
                server, host, port, backlog=backlog, start_serving=False
            )
            break
        except OSError:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await listener.start_serving()
        log.info("listening on http://%s:%d", host, port)
        await stop.wait()
        log.info("stopping: no new connections; requests in flight get %gs", graceful_s)
        listener.close()
        await server.shutdown(graceful_s)
    finally:
        listener.close()
        await app.stop()
