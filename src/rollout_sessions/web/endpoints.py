"""Request bodies and JSON answers, shared by every route.

Kept free of framework machinery on purpose: these run on every request.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from blacksheep import Content, Request, Response, StreamedContent
from blacksheep.exceptions import MessageAborted

from rollout_sessions.web import errors
from rollout_sessions.web._blacksheep import whole
from rollout_sessions.web.errors import ApiError

if TYPE_CHECKING:
    from rollout_sessions.metrics import Metrics

Handler = Callable[[Request], Awaitable[Response]]

JSON_TYPE = b"application/json"

# Answers after which the rest of the request may be unread: the connection
# must not be reused.
_CLOSE_AFTER = frozenset({408, 413})


class Guard:
    """What every request must pass before its route runs.

    - an HTTP/1.1 request without ``Host``, or any request with two, is 400
      (RFC 9112, 3.2);
    - a transfer coding other than ``chunked`` is 501: the body would be
      coded in a way the server does not decode;
    - with ``API_KEY`` set, every route but the public ones (``/health``)
      needs ``Authorization: Bearer <key>`` (the scheme in any case, RFC 9110,
      11.1) or ``x-api-key: <key>`` (as Anthropic clients send it), the key
      compared in constant time; else 401.
    """

    __slots__ = ("_expected",)

    def __init__(self, api_key: str | None) -> None:
        self._expected = api_key.encode() if api_key else None

    def refuse(self, request: Request, public: bool = False) -> ApiError | None:
        hosts = request.get_headers(b"host")
        if len(hosts) > 1:
            return errors.duplicate_host()
        if not hosts and request.scope.get("http_version") != "1.0":
            return errors.missing_host()
        coding = request.get_first_header(b"transfer-encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            return errors.unsupported_transfer_encoding(coding.decode("latin-1"))
        expected = self._expected
        if expected is not None and not public:
            scheme, _, key = (request.get_first_header(b"authorization") or b"").partition(b" ")
            key = key.lstrip(b" ")
            if not (hmac.compare_digest(key, expected) and scheme.lower() == b"bearer"):
                other = request.get_first_header(b"x-api-key")
                if other is None or not hmac.compare_digest(other, expected):
                    return errors.unauthorized()
        return None

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind this guard (for routes not made by ``endpoint``)."""

        async def guarded(request: Request) -> Response:
            err = self.refuse(request)
            if err is not None:
                return error_response(err)
            result = handler(request)
            response = await result if inspect.isawaitable(result) else result
            return as_head(response) if request.method == "HEAD" else response

        guarded.__annotations__ = {"request": Request, "return": Response}
        return guarded


async def _no_body() -> Any:
    return
    yield  # an async generator that yields nothing


def head_answer(
    status: int, headers: list[tuple[bytes, bytes]], content_type: bytes, length: int | None
) -> Response:
    """A ``HEAD`` answer: GET's status and headers, with the ``content-length``
    GET would send (``None``: GET's is chunked), and no body.

    BlackSheep writes the framing headers from a response's content, so the
    length rides on an empty streamed content of that declared length; the
    HTTP server sends no body for ``HEAD``.
    """
    content = StreamedContent(content_type, _no_body, -1 if length is None else length)
    return Response(status, headers, content)


def as_head(response: Response) -> Response:
    """A handler's own ``HEAD`` answer (framing given as headers, no content),
    in ``head_answer``'s form, so the length is sent once and is GET's."""
    if response.content is not None or response.status in (204, 304):
        return response
    declared = response.get_first_header(b"content-length")
    if declared is None or not declared.isdigit():
        return response
    content_type = response.get_first_header(b"content-type") or b"application/octet-stream"
    headers = [
        (name, value)
        for name, value in response.headers.items()
        if name.lower() not in (b"content-length", b"content-type")
    ]
    return head_answer(response.status, headers, content_type, int(declared))


class Served(Protocol):
    """What a route needs of the app's state (``web.state.AppState`` has it)."""

    guard: Guard
    metrics: Metrics


def endpoint(
    state: Served,
    method: str,
    template: str,
    handler: Handler,
    public: bool = False,
    on_error: Callable[[ApiError, Request], Response] | None = None,
) -> Handler:
    """``handler`` as a route: guarded (``Guard``), ``ApiError`` answered as JSON
    (``error_response``, or ``on_error(err, request)`` for a route with its own
    error shape), latency kept in a histogram.

    Every handler takes only ``request`` and is annotated ``-> Response``, so
    BlackSheep calls it directly (no binders, no output wrapper).
    """
    metrics = state.metrics
    refuse = state.guard.refuse
    observe = metrics.route(method, template).observe
    count_error = metrics.responses.inc
    render_error = on_error or (lambda err, request: error_response(err))

    async def route(request: Request) -> Response:
        start = perf_counter()
        try:
            err = refuse(request, public)
            if err is not None:
                raise err
            return await handler(request)
        except ApiError as err:
            count_error(str(err.status))
            return render_error(err, request)
        finally:
            observe(perf_counter() - start)

    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    # Real classes, not the strings postponed annotations leave: BlackSheep
    # calls a handler directly only if it sees `-> Response` itself.
    route.__annotations__ = {"request": Request, "return": Response}
    return route


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole request body; ApiError 413 past ``limit`` bytes, 408 after ``timeout_s``.

    A declared Content-Length over the limit is refused before a byte is
    read; otherwise reading stops at the first chunk that crosses it. Chunks
    are gathered in one growing buffer, so a body sent in tiny chunks costs
    its size, not an object per chunk. Read the body at most once.
    """
    length = request.get_first_header(b"content-length")
    if length is not None:
        if length == b"0":
            return b""
        if int(length) > limit:  # the HTTP server validated the number
            raise errors.body_too_large(limit)
    elif request.get_first_header(b"transfer-encoding") is None:
        return b""  # HTTP/1.1: neither header means there is no body
    content = request.content
    if content is None:
        return b""
    if content.body is not None:  # read before
        return content.body
    try:
        async with asyncio.timeout(timeout_s):
            return await _gather(content, limit)
    except TimeoutError:
        raise errors.body_timeout(timeout_s) from None
    except MessageAborted:
        raise errors.client_disconnected() from None


async def _gather(content: Content, limit: int) -> bytes:
    first = b""
    buf: bytearray | None = None
    async for chunk in content.stream():
        if not chunk:
            continue
        if buf is not None:
            buf += chunk
        elif first:
            buf = bytearray(first)
            buf += chunk
        else:
            first = chunk  # most bodies arrive in one piece: no copy then
        if len(buf if buf is not None else first) > limit:
            raise errors.body_too_large(limit)
    return bytes(buf) if buf is not None else first


def query_string(request: Request) -> str:
    """The request's query string as sent, ``""`` if none."""
    query = request.url.query
    return query.decode("latin-1") if query else ""


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; ApiError 400 (``invalid JSON body: ...``) otherwise."""
    if not body:
        raise errors.bad_json("empty body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_json(str(exc)) from None


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, None, whole(JSON_TYPE, orjson.dumps(obj)))


def raw_json_response(body: bytes, status: int = 200) -> Response:
    """A response from already-serialised JSON bytes."""
    return Response(status, None, whole(JSON_TYPE, body))


def error_response(err: ApiError) -> Response:
    headers = [(b"connection", b"close")] if err.status in _CLOSE_AFTER else None
    return Response(err.status, headers, Content(JSON_TYPE, orjson.dumps({"error": err.message})))
