"""Request body reading and JSON responses shared by every route.

Kept free of framework machinery on purpose: these run on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from blacksheep import Content, Request, Response

from rollout_sessions import errors
from rollout_sessions.errors import ApiError

T = TypeVar("T")


def id_checked(op: Callable[..., T], session_id: str, *args: Any) -> T:
    """``op(session_id, *args)`` for a registry operation; the registry's
    ValueError for an invalid id becomes the 400 answer."""
    try:
        return op(session_id, *args)
    except ValueError as exc:
        raise errors.invalid_session_id(str(exc)) from None


JSON_TYPE = b"application/json"


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, or ApiError 413 once it exceeds ``limit`` bytes.

    Served by ``http1`` the body is already complete (and that layer refused
    it if it was too large). Under an ASGI server (``app_from_env``): a
    declared Content-Length over the limit is refused before reading a byte;
    otherwise chunks are received one by one and reading stops at the first
    chunk that crosses the limit (the ASGI server discards the rest), or as
    soon as the declared Content-Length has arrived. Read the body at most
    once per request.
    """
    content = request.content
    if content is None:  # http1: the request had no body
        return b""
    if content.body is not None:  # complete already (http1, or read before)
        if len(content.body) > limit:
            raise errors.body_too_large(limit)
        return content.body

    # ASGI: the body is still to be received.
    length = request.get_first_header(b"content-length")
    declared = -1  # unknown (chunked)
    if length is not None:
        if length == b"0":
            return b""
        try:
            declared = int(length)
        except ValueError:
            declared = -1  # the HTTP parser normally rejects this earlier
        if declared > limit:
            raise errors.body_too_large(limit)
    elif request.get_first_header(b"transfer-encoding") is None:
        # HTTP/1.1: neither header means there is no body.
        return b""

    receive = content.receive  # BlackSheep's ASGIContent

    first = b""
    parts: list[bytes] | None = None
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.client_disconnected()
        chunk = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise errors.body_too_large(limit)
            # Most bodies arrive in one message: avoid the join then.
            if parts is not None:
                parts.append(chunk)
            elif first:
                parts = [first, chunk]
            else:
                first = chunk
        # Done at the declared length: the HTTP layer has framed the whole
        # body, so waiting for a closing empty message (granian sends one, a
        # round trip to its I/O thread) would only add latency.
        if total == declared or not message.get("more_body", False):
            break
    return b"".join(parts) if parts is not None else first


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; ApiError 400 (``invalid JSON body: ...``) otherwise."""
    if not body:
        raise errors.bad_json("empty body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_json(str(exc)) from None


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, None, Content(JSON_TYPE, orjson.dumps(obj)))


def raw_json_response(body: bytes, status: int = 200) -> Response:
    """A response from already-serialised JSON bytes."""
    return Response(status, None, Content(JSON_TYPE, body))


def error_response(err: ApiError) -> Response:
    # After a 413 the rest of the body may be unread: the HTTP server then
    # closes the connection, so tell the client not to reuse it.
    headers = [(b"connection", b"close")] if err.status == 413 else None
    return Response(err.status, headers, Content(JSON_TYPE, orjson.dumps({"error": err.message})))
