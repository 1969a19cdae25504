"""A lean HTTP/1.1 load client: one keep-alive connection per simulated client.

For the benchmarks only (the product's client is aiohttp): per request it
costs one write and one future, so on a 2-core machine the load generator
spends its CPU on requests, not on itself, and does not become the
bottleneck it would otherwise be. Handles Content-Length, chunked and
204/304 answers; loopback targets only (``check_loopback``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson

from rollout_sessions.routes.turn import FORCED_FLAGS
from rollout_sessions.testing.client import chat_path, check_loopback

__all__ = ["HttpClient", "HttpError", "check_loopback", "percentile"]


class HttpError(Exception):
    """The connection failed or the answer was not valid HTTP/1.1."""


def _parse_response(buf: bytearray, method: str) -> tuple[int, int, bytes, bool] | None:
    """One complete response at the start of ``buf``: (consumed, status, body, close).

    ``None`` while incomplete. Handles Content-Length, chunked and 204/304.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = -1
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    start = end + 4
    if method == "HEAD" or status in (204, 304) or status < 200:
        return start, status, b"", close
    if chunked:
        pos, body = start, []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                fin = buf.find(b"\r\n", eol + 2)  # no trailers expected
                if fin < 0:
                    return None
                return fin + 2, status, b"".join(body), close
            if len(buf) < eol + 2 + size + 2:
                return None
            body.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2
    if length < 0:
        raise ValueError("response without Content-Length or chunked framing")
    if len(buf) < start + length:
        return None
    return start + length, status, bytes(buf[start : start + length]), close


class _Conn(asyncio.Protocol):
    """The socket side of ``HttpClient``: buffers bytes, completes one waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.method = "GET"
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            done = _parse_response(self.buf, self.method)
        except ValueError as e:
            waiter.set_exception(HttpError(f"malformed response: {e}"))
            return
        if done is not None:
            consumed, status, body, close = done
            del self.buf[:consumed]
            waiter.set_result((status, body, close))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by peer'}"))


class HttpClient:
    """One keep-alive HTTP/1.1 connection; requests on it run one at a time.

    A plain ``asyncio.Protocol`` rather than streams: per request it costs a
    write and one future, so a load generator spends its CPU on requests,
    not on itself. Reconnects lazily after a failure or a ``Connection:
    close``. Callers keep it on loopback (``check_loopback``).
    """

    __slots__ = ("host", "port", "timeout", "_conn", "_host_header")

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._conn: _Conn | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    @classmethod
    def for_url(cls, url: str, timeout: float = 60.0) -> HttpClient:
        host, port = split_url(url)
        return cls(host, port, timeout)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request; return (status, body). Raises HttpError on failure."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.lost:
            try:
                _, conn = await loop.create_connection(_Conn, self.host, self.port)
            except OSError as e:
                raise HttpError(f"{method} {path}: cannot connect: {e}") from e
            sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), path.encode()) + self._host_header
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        waiter = conn.waiter = loop.create_future()
        conn.method = method
        conn.transport.write(head + b"\r\n" + body if body else head + b"\r\n")  # type: ignore[union-attr]
        timer = loop.call_later(self.timeout, waiter.cancel)
        try:
            status, data, close = await waiter
        except asyncio.CancelledError:
            await self.close()
            if timer.when() <= loop.time():  # our timer fired, not an outside cancel
                raise HttpError(f"{method} {path}: timed out after {self.timeout}s") from None
            raise
        except HttpError as e:
            await self.close()
            raise HttpError(f"{method} {path}: {e}") from e
        finally:
            timer.cancel()
            conn.waiter = None
        if close:
            await self.close()
        return status, data


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    return parts.hostname, parts.port or 80


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


async def create_session(client: HttpClient, session_id: str | None = None) -> tuple[int, str]:
    body = None if session_id is None else json.dumps({"session_id": session_id}).encode()
    status, data = await client.request("POST", "/sessions", body)
    if status == 200:
        return status, json.loads(data)["session_id"]
    return status, session_id or ""


async def get_session(client: HttpClient, session_id: str) -> tuple[int, bytes]:
    return await client.request("GET", f"/sessions/{session_id}")


async def delete_session(client: HttpClient, session_id: str) -> int:
    status, _ = await client.request("DELETE", f"/sessions/{session_id}")
    return status


def chat_request(
    session_id: str | None, messages: list[dict[str, Any]], **fields: Any
) -> tuple[str, bytes]:
    """``(path, body)`` of a chat turn through ``session_id`` (``None``: the backend
    directly, with the flags the session server would force)."""
    req: dict[str, Any] = {"model": "echo", "messages": messages, "max_tokens": 16, **fields}
    if session_id is None:
        req.update(FORCED_FLAGS)
    return chat_path(session_id), orjson.dumps(req)


async def chat_turn(
    client: HttpClient, session_id: str | None, messages: list[dict[str, Any]], **fields: Any
) -> tuple[int, bytes]:
    """One chat turn through ``session_id`` (``None``: the backend directly)."""
    return await client.request("POST", *chat_request(session_id, messages, **fields))
