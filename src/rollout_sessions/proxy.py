"""The upstream side: pooled keep-alive HTTP clients, and the generic session proxy.

``Upstream`` owns the process's connections to the inference backend, in two
keep-alive pools over the same upstream, both sized for thousands of
concurrent turns:

- chat turns to a plain-HTTP upstream (the hot path) go through
  ``_ChatPool``, a small HTTP/1.1 client on ``httptools``: one write per
  request, LIFO connection reuse, a timer instead of a timeout task. Measured
  against ``aiohttp`` with the same echo backend (benchmarks/RESULTS.md,
  "Upstream client"), it answers in about half the time with one request in
  flight, serves about twice the requests/s with 64, and costs the event loop
  about a third of the CPU per call;
- everything else, the generic proxy and chat to an HTTPS upstream, goes
  through one ``aiohttp.ClientSession``.

Transport failures become 502 and timeouts 504 (``errors``), in one place.

``forward`` implements ``* /sessions/{id}/{path}``: the request is sent to
``{upstream}/{path}`` unchanged (method, query, body, end-to-end headers) and
the answer comes back unchanged; no session state is touched. The sub-path is
checked so that it can never leave the upstream base.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import httptools
from blacksheep import Content, Response
from yarl import URL

from rollout_sessions import errors
from rollout_sessions.errors import ApiError

if TYPE_CHECKING:
    from rollout_sessions.config import Settings
    from rollout_sessions.state import AppState

# Hop-by-hop headers (RFC 9110 section 7.6.1) plus the framing headers that the
# client recomputes from the body it actually sends.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
    }
)
_HOP_BY_HOP_B = frozenset(h.encode() for h in _HOP_BY_HOP)

# Headers the chat turn never forwards: it sends its own JSON body and wants an
# uncompressed answer it can parse.
_CHAT_DROP_B = _HOP_BY_HOP_B | {b"content-type", b"accept-encoding"}

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")

# Large enough for thousands of turns in flight at once; the OS file limit is
# the real bound.
POOL_LIMIT = 16384
# Idle keep-alive connections the chat pool keeps for reuse.
MAX_IDLE = 2048


class _Disconnected(Exception):
    """The upstream closed the connection before the answer was complete."""

    def __init__(self, got_bytes: bool, cause: BaseException | None) -> None:
        super().__init__(str(cause) if cause else "server disconnected")
        self.got_bytes = got_bytes


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the chat fast path."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "waiter",
        "headers",
        "body",
        "got_bytes",
        "closed",
        "until_eof",
    )

    def __init__(self, pool: _ChatPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.got_bytes = False
        self.closed = False
        self.until_eof = False  # an answer framed by the end of the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if self.until_eof and exc is None:
            status = self.parser.get_status_code()
            waiter.set_result((status, self.headers, b"".join(self.body)))
        else:
            waiter.set_exception(_Disconnected(self.got_bytes, exc))

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(_Disconnected(True, ConnectionError(f"invalid HTTP answer: {exc}")))

    def fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        framed = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        )
        status = self.parser.get_status_code()
        self.until_eof = not framed and status >= 200 and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue...): the real one follows
            self.headers = []
            self.body = []
            return
        body = self.body
        result = (status, self.headers, body[0] if len(body) == 1 else b"".join(body))
        self.headers = []
        self.body = []
        waiter, self.waiter = self.waiter, None
        if parser.should_keep_alive() and not self.closed:
            self.got_bytes = False
            self.pool.release(self)
        else:
            self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_result(result)


class _ChatPool:
    """Keep-alive connections to one plain-HTTP upstream, for the chat hot path.

    A lean HTTP/1.1 client (httptools parser, one write per request, a timer
    instead of a timeout task): the chat turn is the request the benchmarks
    time, and a general-purpose client costs several times more per call.
    Connections are created on demand (no cap: one per turn in flight) and
    reused LIFO. A request that finds a reused connection closed before any
    answer byte arrived is retried once on a fresh connection.
    """

    __slots__ = ("host", "port", "head", "timeout_s", "idle", "live", "closed")

    def __init__(self, host: str, port: int, path: str, timeout_s: float) -> None:
        self.host = host
        self.port = port
        host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.head = (path, host_header)
        self.timeout_s = timeout_s
        self.idle: list[_Conn] = []
        self.live: set[_Conn] = set()
        self.closed = False

    def release(self, conn: _Conn) -> None:
        if len(self.idle) >= MAX_IDLE:
            conn.abort()  # a burst is over: don't hold thousands of idle sockets
        else:
            self.idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        self.live.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        self.closed = True
        for conn in list(self.live):
            conn.abort()
        self.idle.clear()
        self.live.clear()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.live.add(conn)
        return conn

    async def post(self, query: bytes, headers: bytes, body: bytes) -> tuple[int, Any, bytes]:
        path, host_header = self.head
        target = path + "?" + query.decode("latin-1") if query else path
        message = b"".join(
            (
                b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n"
                % (target.encode("latin-1"), host_header.encode("latin-1"), len(body)),
                headers,
                b"\r\n",
                body,
            )
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in (0, 1):
            if self.closed:
                raise errors.upstream_transport_error("the upstream client is shut down")
            idle = self.idle
            conn = None
            while idle:
                conn = idle.pop()
                if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                    break
                conn = None
            reused = conn is not None
            if conn is None:
                try:
                    conn = await asyncio.wait_for(self._connect(loop), deadline - loop.time())
                except TimeoutError:
                    raise errors.upstream_timeout(self.timeout_s) from None
                except OSError as exc:
                    raise errors.upstream_transport_error(_describe(exc)) from None
            waiter = loop.create_future()
            conn.waiter = waiter
            conn.transport.write(message)  # type: ignore[union-attr]
            timer = loop.call_at(deadline, _expire, conn, waiter)
            try:
                return await waiter
            except _Disconnected as exc:
                if reused and not exc.got_bytes and attempt == 0:
                    continue  # the server had closed an idle connection: retry once
                raise errors.upstream_transport_error(f"ServerDisconnectedError: {exc}") from None
            except TimeoutError:
                raise errors.upstream_timeout(self.timeout_s) from None
            except BaseException:
                conn.abort()  # cancelled mid-answer: never reuse this connection
                raise
            finally:
                timer.cancel()
        raise AssertionError("unreachable")


def _expire(conn: _Conn, waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        conn.fail(TimeoutError())


class Upstream:
    """The pooled client to the inference backend (create in, and use from, one loop).

    Two pools over the same upstream: a lean keep-alive client for chat turns
    to a plain-HTTP upstream (the hot path), and one ``aiohttp`` session for
    everything else (the generic proxy, HTTPS upstreams).
    """

    __slots__ = ("settings", "base_url", "timeout_s", "_session", "_chat_url", "_chat_pool")

    def __init__(self, settings: Settings, base_url: str | None = None) -> None:
        self.settings = settings
        self.base_url: str = (base_url or settings.upstream or "").rstrip("/")
        self.timeout_s: float = float(settings.upstream_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._chat_url: URL | None = None
        self._chat_pool: _ChatPool | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        if not self.base_url:
            raise RuntimeError("Upstream.start(): no upstream URL configured")
        connector = aiohttp.TCPConnector(
            limit=POOL_LIMIT,
            limit_per_host=POOL_LIMIT,
            keepalive_timeout=75.0,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            # Proxied bodies pass through byte for byte (content-encoding kept).
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            raise_for_status=False,
        )
        self._chat_url = URL(self.base_url + "/v1/chat/completions", encoded=True)
        parts = urlsplit(self.base_url)
        if parts.scheme == "http" and parts.hostname:
            self._chat_pool = _ChatPool(
                parts.hostname,
                parts.port or 80,
                (parts.path or "") + "/v1/chat/completions",
                self.timeout_s,
            )

    async def close(self) -> None:
        pool, self._chat_pool = self._chat_pool, None
        if pool is not None:
            pool.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            await self.start()
        assert self._session is not None
        return self._session

    async def send(
        self,
        method: str,
        url: URL,
        headers: Any,
        body: bytes | None,
        *,
        decompress: bool = False,
    ) -> tuple[int, Any, bytes]:
        """One request upstream: ``(status, raw response headers, body)``.

        Raises ``ApiError`` 504 on timeout and 502 on any transport failure.
        """
        session = self._session or await self._client()
        try:
            async with session.request(
                method, url, headers=headers, data=body, auto_decompress=decompress
            ) as resp:
                data = await resp.read()
                return resp.status, resp.raw_headers, data
        except TimeoutError:
            # aiohttp's timeouts subclass asyncio.TimeoutError (== TimeoutError).
            raise errors.upstream_timeout(self.timeout_s) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.upstream_transport_error(_describe(exc)) from None

    async def chat(self, body: bytes, headers: bytes, query: bytes = b"") -> tuple[int, Any, bytes]:
        """POST a forced chat body to ``{upstream}/v1/chat/completions``.

        ``headers`` are extra request header lines (``chat_headers``). The
        answer body is decoded if the upstream compressed it anyway.
        """
        pool = self._chat_pool
        if pool is None:
            await self._client()
            pool = self._chat_pool
        if pool is not None:
            status, raw_headers, data = await pool.post(query, headers, body)
            for name, value in raw_headers:
                if name.lower() == b"content-encoding" and value.lower() != b"identity":
                    # Compressed although not asked to: decode, and say so.
                    data = _decode_body(value, data)
                    raw_headers = [h for h in raw_headers if h[0].lower() != b"content-encoding"]
                    break
            return status, raw_headers, data
        url = self._chat_url
        assert url is not None
        if query:
            url = URL(str(url) + "?" + query.decode("latin-1"), encoded=True)
        extra = [tuple(line.split(": ", 1)) for line in headers.decode("latin-1").split("\r\n")]
        pairs = [("Content-Type", "application/json"), *(p for p in extra if len(p) == 2)]
        return await self.send("POST", url, pairs, body, decompress=True)


def _decode_body(encoding: bytes, data: bytes) -> bytes:
    name = encoding.strip().lower()
    try:
        if name in (b"gzip", b"x-gzip"):
            return zlib.decompress(data, 16 + zlib.MAX_WBITS)
        if name == b"deflate":
            return zlib.decompress(data)
    except zlib.error as exc:
        raise errors.upstream_malformed(f"cannot decode {name.decode()} body: {exc}") from None
    raise errors.upstream_malformed(f"unsupported content-encoding {name.decode()!r}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def chat_headers(request: Any) -> bytes:
    """End-to-end client headers worth passing on a chat turn (auth, tracing), as lines."""
    return b"".join(
        [
            name + b": " + value + b"\r\n"
            for name, value in request.headers
            if name.lower() not in _CHAT_DROP_B
        ]
    )


def _request_headers(request: Any) -> dict[str, str] | list[tuple[str, str]]:
    connection_tokens: set[str] = set()
    for value in request.headers.get(b"connection"):
        connection_tokens.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    out: list[tuple[str, str]] = []
    for name, value in request.headers:
        key = name.decode("latin-1").lower()
        if key in _HOP_BY_HOP or key in connection_tokens:
            continue
        out.append((key, value.decode("latin-1")))
    return out


def safe_subpath(raw: str) -> str | None:
    """The sub-path if it stays under the upstream base, else ``None``.

    ``raw`` is the path as the client sent it (percent-encoding intact). It is
    checked as sent and after each round of percent-decoding, so ``..``,
    ``%2e%2e``, ``%252e%252e``, ``//``, backslashes and schemes are all caught.
    """
    current = raw
    for _ in range(4):
        if not _plain_subpath_ok(current):
            return None
        decoded = unquote(current)
        if decoded == current:
            return raw
        current = decoded
    return None  # still decoding after four rounds: refuse rather than guess


def _plain_subpath_ok(path: str) -> bool:
    if path.startswith("/") or "//" in path or "\\" in path:
        return False
    if any(ch < " " or ch == "\x7f" for ch in path):
        return False
    if _SCHEME_RE.match(path):
        return False
    for segment in path.split("/"):
        if segment == ".." or segment == ".":
            return False
    return True


def _raw_subpath(request: Any, session_id: str, path: str) -> str:
    """The sub-path after ``/sessions/{id}/`` exactly as the client encoded it."""
    raw = request.url.path
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    parts = raw.split("/", 3)
    if len(parts) == 4 and parts[1] == "sessions" and unquote(parts[2]) == session_id:
        return parts[3]
    # Not under the usual prefix (a mounted app, say): re-encode the route value.
    return quote(path, safe="/:@!$&'()*+,;=-._~%")


async def forward(state: AppState, session_id: str, path: str, request: Any) -> Response:
    """``* /sessions/{id}/{path}`` -> ``{upstream}/{path}``, byte for byte.

    Raises ``ApiError``: 400 for a path that would leave the upstream base, 413
    for a body over the limit, 502/504 for upstream failures.
    """
    from rollout_sessions.httputil import read_body

    raw = _raw_subpath(request, session_id, path)
    sub = safe_subpath(raw)
    if sub is None:
        raise errors.proxy_path_refused(unquote(raw))
    upstream = state.upstream
    target = upstream.base_url + "/" + sub
    query = request.url.query
    if query:
        target += "?" + (query.decode("latin-1") if isinstance(query, bytes) else query)
    body = await read_body(request, state.settings.max_body_bytes)
    try:
        status, raw_headers, data = await upstream.send(
            request.method, URL(target, encoded=True), _request_headers(request), body or None
        )
    except ApiError as exc:
        state.metrics.upstream_errors.inc("timeout" if exc.status == 504 else "transport")
        raise
    return passthrough_response(status, raw_headers, data)


def passthrough_response(status: int, raw_headers: Any, data: bytes) -> Response:
    """The upstream answer as-is, minus hop-by-hop and framing headers."""
    content_type = b"application/octet-stream"
    headers: list[tuple[bytes, bytes]] = []
    for name, value in raw_headers:
        key = name.lower()
        if key == b"content-type":
            content_type = value
        elif key not in _HOP_BY_HOP_B:
            headers.append((name, value))
    if status in (204, 304) or (100 <= status < 200):
        return Response(status, headers, None)
    return Response(status, headers, Content(content_type, data))
