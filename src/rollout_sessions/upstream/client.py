"""The one HTTP client to the inference backend: a pooled ``aiohttp`` session.

Every upstream call, chat turn or forwarded request, goes through
``Upstream``. Its rules:

- keep-alive connections, pooled by aiohttp; a pooled connection that
  delivers bytes while no request of ours is waiting on it is closed, never
  reused (``StrictResponseHandler``), so an answer is matched to its own
  request only;
- redirects are answered back to the client, never followed;
- an answer larger than ``max_answer_bytes`` is refused (502) and its
  connection dropped;
- the whole call is bounded by ``timeout_s`` (504); any transport failure is
  502. Both errors are built in ``errors``, so their texts exist once;
- a call made for a session carries its id in ``routing_header``
  (``UPSTREAM_ROUTING_HEADER``), replacing any value the client sent;
- a call whose task is cancelled (a DELETE of its session) closes its
  connection: it never goes back to the pool half-read;
- ``UPSTREAM_API_KEY`` is sent as ``Authorization: Bearer <key>``; the
  client's own ``Authorization`` (or ``x-api-key``) is forwarded only when the
  server has no ``API_KEY`` of its own (the server's key never leaves it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from rollout_sessions.upstream._aiohttp import strict_connector
from rollout_sessions.web import errors

# Hop-by-hop headers (RFC 9110, 7.6.1) and the framing headers the client
# recomputes from the body it actually sends: never forwarded either way.
HOP_BY_HOP = frozenset(
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

# A chat turn sends its own JSON body and wants an answer it can parse.
_CHAT_DROP = HOP_BY_HOP | {"content-type", "content-encoding", "accept-encoding", "accept"}

# The client's credentials (a bearer, or an Anthropic client's key): forwarded
# only when the server has no API_KEY of its own.
_CLIENT_AUTH = frozenset({"authorization", "x-api-key"})

# Thousands of turns may be in flight at once; the OS file limit is the real bound.
POOL_LIMIT = 16384
# Seconds an idle pooled connection is kept for reuse.
POOL_KEEPALIVE_S = 60.0


@dataclass(slots=True)
class Answer:
    """A complete upstream answer."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Upstream:
    """The pooled client to one backend base URL; create, use and close on one loop."""

    __slots__ = (
        "base_url",
        "timeout_s",
        "max_answer_bytes",
        "forward_client_auth",
        "routing_header",
        "_auth",
        "_session",
    )

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        max_answer_bytes: int,
        api_key: str | None = None,
        forward_client_auth: bool = True,
        routing_header: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.forward_client_auth = forward_client_auth
        self.routing_header = routing_header
        self._auth = f"Bearer {api_key}" if api_key else None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=strict_connector(
                    limit=POOL_LIMIT, keepalive_timeout=POOL_KEEPALIVE_S, ttl_dns_cache=300
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                # Forwarded bodies pass byte for byte; chat asks for identity.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                raise_for_status=False,
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def url(self, sub_path: str, query: str = "") -> URL:
        """``{base}/{sub_path}?{query}``, with ``sub_path`` already percent-encoded."""
        target = f"{self.base_url}/{sub_path}"
        if query:
            target += "?" + query
        return URL(target, encoded=True)

    def headers(
        self,
        client_headers: Iterable[tuple[str, str]],
        drop: frozenset[str],
        session_id: str | None = None,
    ) -> CIMultiDict[str]:
        """The client's end-to-end headers to send upstream, with our credentials
        and, for a call made for a session, its routing key."""
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in client_headers:
            key = name.lower()
            if key in drop or (key in _CLIENT_AUTH and not self.forward_client_auth):
                continue
            out.add(name, value)
        if self._auth is not None:
            out["Authorization"] = self._auth
        routing = self.routing_header
        if routing is not None and session_id is not None:
            out[routing] = session_id  # replaces the client's value, whatever its case
        return out

    async def chat(
        self,
        body: bytes,
        client_headers: Iterable[tuple[str, str]],
        query: str,
        session_id: str | None = None,
    ) -> Answer:
        """POST a chat body to ``{base}/v1/chat/completions``; the complete answer."""
        headers = self.headers(client_headers, _CHAT_DROP, session_id)
        headers["Content-Type"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        return await self.request("POST", self.url("v1/chat/completions", query), headers, body)

    async def request(
        self, method: str, url: URL, headers: CIMultiDict[str], body: bytes | None
    ) -> Answer:
        """One call, its answer read completely (at most ``max_answer_bytes``)."""
        session = self._started()
        try:
            async with session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            ) as resp:
                try:
                    data = await self._read_all(resp)
                except asyncio.CancelledError:
                    resp.close()  # half-read: the connection must never be reused
                    raise
                return Answer(resp.status, _raw_headers(resp), data)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translated(exc, self.timeout_s) from None

    async def open_stream(
        self, method: str, url: URL, headers: CIMultiDict[str], body: bytes | None
    ) -> tuple[Answer, AsyncIterator[bytes]]:
        """One call whose answer body is streamed back: ``(head, chunks)``.

        The head's ``body`` is empty. ``chunks`` yields the body and releases
        the connection at its end; past ``max_answer_bytes`` it stops with
        ``ApiError`` 502 and drops the connection. A declared length over the
        limit is refused before the first chunk.
        """
        session = self._started()
        try:
            resp = await session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translated(exc, self.timeout_s) from None
        try:
            self._check_declared(resp)
        except BaseException:
            resp.release()
            raise
        return Answer(resp.status, _raw_headers(resp), b""), self._chunks(resp)

    # -- internals ---------------------------------------------------------

    def _started(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise errors.upstream_transport_error("the upstream client is not started")
        return self._session

    def _check_declared(self, resp: aiohttp.ClientResponse) -> None:
        length = resp.content_length
        if length is not None and length > self.max_answer_bytes:
            resp.close()  # drop the connection: the rest of the answer is never read
            raise errors.upstream_too_large(self.max_answer_bytes)

    async def _read_all(self, resp: aiohttp.ClientResponse) -> bytes:
        self._check_declared(resp)
        if resp.content_length is not None:
            return await resp.read()
        limit = self.max_answer_bytes
        buf = bytearray()
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                resp.close()
                raise errors.upstream_too_large(limit)
        return bytes(buf)

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        total = 0
        try:
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                if total > self.max_answer_bytes:
                    resp.close()
                    raise errors.upstream_too_large(self.max_answer_bytes)
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            resp.close()
            raise _translated(exc, self.timeout_s) from None
        finally:
            resp.release()


def _translated(exc: BaseException, timeout_s: float) -> BaseException:
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts subclass it
        return errors.upstream_timeout(timeout_s)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return errors.upstream_transport_error(_describe(exc))
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _raw_headers(resp: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
