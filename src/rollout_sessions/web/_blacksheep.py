"""BlackSheep's private API, used here and in ``routing.py`` only (docs/internals.md;
tested in tests/unit/test_adapters.py).

BlackSheep is pinned to one minor version; if an upgrade changes what a name
used here does, those tests say which.

- ``raw_path(request)``: the request target's path as received, undecoded
  (``Request._path``, what BlackSheep's own router matches on; the public
  ``request.url.path`` parses the target again and fails on bytes that are
  not UTF-8);
- ``document_without_binders(endpoint)``: BlackSheep documents a handler's
  parameters only if it carries binders; ours take the bare request, so
  they get an empty binder list (``endpoint.binders``);
- ``whole(content_type, body)``: a body sent in one piece. BlackSheep sends a
  ``Content`` longer than ``SLICE_BYTES`` (its ``MAX_RESPONSE_CHUNK_SIZE``,
  not exported by its compiled module) as copied slices, one ASGI message
  and socket write each; a chat answer is 70-120 KB. A ``StreamedContent``
  of declared length is framed by ``content-length`` and sent as it is
  yielded: here the body itself, once.

``all_routes(router)`` uses public API only (``Router.registered_routes``):
every route added so far, including those BlackSheep applies only when the
app starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from blacksheep import Content, Request, Router, StreamedContent
from blacksheep.server.routing import Route

SLICE_BYTES = 61_440


def raw_path(request: Request) -> bytes:
    return request._path


def document_without_binders(endpoint: Any) -> None:
    endpoint.binders = []


def all_routes(router: Router) -> Iterator[Route]:
    for routes in router.routes.values():
        yield from routes
    for _method, route in router.registered_routes:
        yield route


def whole(content_type: bytes, body: bytes) -> Content:
    if len(body) <= SLICE_BYTES:
        return Content(content_type, body)

    async def provide() -> AsyncIterator[bytes]:
        yield body

    return StreamedContent(content_type, provide, len(body))
