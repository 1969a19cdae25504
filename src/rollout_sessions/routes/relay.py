"""Relaying to and from the upstream: the client's headers that go out, and an
upstream answer passed back as it came (the chat turn and the generic proxy)."""

from __future__ import annotations

from blacksheep import Request, Response

from rollout_sessions.upstream.client import HOP_BY_HOP, Answer
from rollout_sessions.web.endpoints import whole

# The answer's own server and date would duplicate those our server sends.
_NOT_PASSED_BACK = frozenset(h.encode() for h in HOP_BY_HOP) | {b"server", b"date"}


def client_headers(request: Request) -> list[tuple[str, str]]:
    """The client's end-to-end headers (minus those its ``Connection`` names)."""
    named: set[bytes] = set()
    for value in request.headers.get(b"connection"):
        named.update(token.strip().lower() for token in value.split(b","))
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in request.headers
        if name.lower() not in named
    ]


def answer_headers(answer: Answer) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    content_type = b"application/octet-stream"
    headers: list[tuple[bytes, bytes]] = []
    for name, value in answer.headers:
        key = name.lower().encode("latin-1")
        if key == b"content-type":
            content_type = value.encode("latin-1")
        elif key not in _NOT_PASSED_BACK:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return content_type, headers


def passthrough(answer: Answer) -> Response:
    """The upstream answer as-is, minus hop-by-hop and framing headers (and its
    ``server`` and ``date``: ours are sent)."""
    content_type, headers = answer_headers(answer)
    if answer.status in (204, 304) or answer.status < 200:
        return Response(answer.status, headers, None)
    return Response(answer.status, headers, whole(content_type, answer.body))
