"""``* /sessions/{id}/{path}``: forwarded to ``{upstream}/{path}``, no session state touched.

The request goes out unchanged (method, query, body, end-to-end headers)
and the answer comes back unchanged, streamed when it is long or has no
declared length. The sub-path is checked as sent and after every round of
percent-decoding, so it can never leave the upstream base. A sub-path that
decodes to the chat route is the chat route (``is_chat_subpath``), and one
that decodes to another turn route (``TurnRoute``: the Anthropic Messages
routes) is that route: the generic proxy never carries a turn.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from blacksheep import Application, Request, Response, StreamedContent
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions.routes.chat import chat_completions
from rollout_sessions.routes.relay import answer_headers, client_headers, passthrough
from rollout_sessions.upstream.client import HOP_BY_HOP, Answer
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import (
    endpoint,
    error_response,
    head_answer,
    query_string,
    read_body,
)
from rollout_sessions.web.errors import ApiError
from rollout_sessions.web.openapi import ID_PARAM, PATH_PARAM, document
from rollout_sessions.web.routing import CHAT_PATH, CHAT_SUBPATH, raw_subpath

if TYPE_CHECKING:
    from rollout_sessions.web.state import AppState

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")
# Answers up to this size are read whole and sent with their length; longer
# ones, and those of unknown length (SSE), stream through.
BUFFER_UP_TO = 1 << 20


def safe_subpath(raw: str) -> str | None:
    """The sub-path if it stays under the upstream base, else ``None``.

    ``raw`` is the path as the client sent it (percent-encoding intact). It is
    checked as sent and after each round of percent-decoding, so ``..``,
    ``%2e%2e``, ``%252e%252e``, ``//``, backslashes and schemes are all caught.
    """
    for current in decodings(raw):
        if not _plain_subpath_ok(current):
            return None
    return raw


def decodings(raw: str, rounds: int = 4) -> list[str]:
    """``raw`` and each distinct percent-decoding of it, in order.

    More than ``rounds`` rounds of decoding is refused (an empty list), rather
    than guessed at.
    """
    out = [raw]
    for _ in range(rounds):
        decoded = unquote(out[-1])
        if decoded == out[-1]:
            return out
        out.append(decoded)
    return []


def _plain_subpath_ok(path: str) -> bool:
    if path.startswith("/") or "//" in path or "\\" in path:
        return False
    if any(ch < " " or ch == "\x7f" for ch in path):
        return False
    if _SCHEME_RE.match(path):
        return False
    return all(segment not in ("..", ".") for segment in path.split("/"))


async def forward(
    state: AppState, raw_subpath: str, request: Request, session_id: str | None = None
) -> Response:
    """Forward one request; ``ApiError`` 400 (escaping path), 413, 502 or 504.

    ``session_id``: the session it is made for (sent as the routing key)."""
    sub = safe_subpath(raw_subpath)
    if sub is None:
        raise errors.proxy_path_refused(unquote(raw_subpath))
    settings = state.settings
    upstream = state.upstream
    body = await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
    url = upstream.url(sub, query_string(request))
    headers = upstream.headers(client_headers(request), HOP_BY_HOP, session_id)
    try:
        head, chunks = await upstream.open_stream(request.method, url, headers, body or None)
    except ApiError as exc:
        state.metrics.upstream_errors.inc("timeout" if exc.status == 504 else "transport")
        raise
    length = _declared_length(head)
    if head.status in (204, 304) or head.status < 200:
        await _drain(chunks)
        return passthrough(head)
    if request.method == "HEAD":  # the upstream's length, as its GET would send it
        await _drain(chunks)
        content_type, headers_out = answer_headers(head)
        return head_answer(head.status, headers_out, content_type, length)
    if length is not None and length <= BUFFER_UP_TO:
        head.body = b"".join([chunk async for chunk in chunks])
        return passthrough(head)
    content_type, headers_out = answer_headers(head)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    return Response(head.status, headers_out, StreamedContent(content_type, body))


def _declared_length(answer: Answer) -> int | None:
    for name, value in answer.headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


def is_chat_subpath(raw: str) -> bool:
    """Whether a sub-path is the chat route in a form a backend may read as it:
    as sent or after any round of percent-decoding, with a trailing slash,
    ``;parameters`` on a segment, or a ``?``/``#`` that decoding revealed."""
    return named_subpath(raw, (CHAT_SUBPATH,)) is not None


def named_subpath(raw: str, subpaths: tuple[str, ...]) -> str | None:
    """Which of ``subpaths`` a sub-path names, in any of the forms ``is_chat_subpath``
    accepts (``None``: none of them)."""
    for current in decodings(raw):
        path = _QUERY_OR_FRAGMENT.split(current, maxsplit=1)[0]
        segments = [segment.split(";", 1)[0] for segment in path.split("/")]
        named = "/".join(segments).rstrip("/")
        if named in subpaths:
            return named
    return None


PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
TurnHandler = Callable[["AppState", str, Request], Awaitable[Response]]


@dataclass(frozen=True)
class TurnRoute:
    """Another ``POST`` route under a session that is a turn, not a forward.

    ``handler`` checks the method itself (it is also reached, for any method,
    through the generic route by an encoded path); its ``ApiError``s, and the
    guard's, are answered by ``render_error``. The rest documents it.
    """

    handler: TurnHandler
    render_error: Callable[[ApiError], Response]
    summary: str
    description: str
    tags: list[str]
    responses: dict[int, str] = field(default_factory=dict)


def add_routes(
    app: Application,
    docs: OpenAPIHandler,
    state: AppState,
    turns: Mapping[str, TurnRoute] | None = None,
) -> None:
    """``POST /sessions/{id}/{sub-path}`` for each of ``turns``, and the generic
    proxy, ``* /sessions/{id}/{path}`` (a sub-path naming the chat route or one
    of ``turns`` in any encoding is that route, never forwarded)."""
    turns = dict(turns or {})
    named = (CHAT_SUBPATH, *turns)

    async def proxy_route(request: Request) -> Response:
        sid = request.route_values["id"]
        state.sessions.check_id(sid)
        raw = raw_subpath(request)
        sub = named_subpath(raw, named)
        if sub == CHAT_SUBPATH:  # e.g. v1/chat/%63ompletions: still the chat route
            if request.method != "POST":
                raise errors.method_not_allowed(
                    request.method, "/sessions/{id}" + CHAT_PATH, "POST"
                )
            return await chat_completions(state, sid, request)
        if sub is not None:
            return await turns[sub].handler(state, sid, request)
        return await forward(state, raw, request, sid)

    def proxy_error(err: ApiError, request: Request) -> Response:
        """An encoded turn path's errors (the guard's too) in that route's shape."""
        sub = named_subpath(raw_subpath(request), tuple(turns)) if turns else None
        return turns[sub].render_error(err) if sub is not None else error_response(err)

    for sub, turn in turns.items():
        template = "/sessions/{id}/" + sub
        handler = turn.handler

        async def turn_route(request: Request, handler: TurnHandler = handler) -> Response:
            return await handler(state, request.route_values["id"], request)

        ep = document(
            docs,
            endpoint(
                state,
                "POST",
                template,
                turn_route,
                on_error=lambda err, request, turn=turn: turn.render_error(err),
            ),
            summary=turn.summary,
            description=turn.description,
            tags=turn.tags,
            parameters=ID_PARAM,
            responses=turn.responses,
        )
        app.router.add_post(template, ep)

    for method in PROXY_METHODS:
        ep = document(
            docs,
            endpoint(state, method, "/sessions/{id}/{path}", proxy_route, on_error=proxy_error),
            summary="Forward to the upstream",
            description="Forwarded to `{upstream}/{path}`; no session state is touched.",
            tags=["proxy"],
            parameters={**ID_PARAM, **PATH_PARAM},
            responses={400: "invalid id or a path leaving the upstream base"},
        )
        app.router.add(method, "/sessions/{id}/{path:path}", ep)
