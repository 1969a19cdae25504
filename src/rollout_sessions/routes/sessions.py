"""The session lifecycle over HTTP: ``POST /sessions``, ``GET`` and ``DELETE /sessions/{id}``.

- ``POST /sessions``: mint an id, or with a body ``{"session_id": id}``
  create under that id (409 if live, 404 if deleted, 400 if invalid);
- ``GET /sessions/{id}``: the trajectory; a never-seen id reads empty and
  stays unknown (restart tolerance); a deleted id is 404;
- ``DELETE /sessions/{id}``: 204; unknown, deleted or closing is 404.

The rules (journal first, the session lock, delete sticks) are the
``Sessions`` service's; this module is their HTTP adapter.
With ``CANCEL_ON_DELETE`` a delete also cancels the session's turns
waiting for the backend (their connections closed); they answer 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from blacksheep import Application, Request, Response, StreamedContent
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.routes.forest_api import get_tree
from rollout_sessions.sessions.session import empty_snapshot, metadata
from rollout_sessions.tito import check as tito_check
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import (
    JSON_TYPE,
    endpoint,
    json_response,
    parse_json,
    raw_json_response,
    read_body,
)
from rollout_sessions.web.openapi import ID_PARAM, document
from rollout_sessions.web.routing import CHAT_PATH, SessionRouter

if TYPE_CHECKING:
    from rollout_sessions.web.state import AppState


def add_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    sessions = state.sessions
    settings = state.settings

    async def create_session(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
        sid = None
        if body:
            data = parse_json(body)
            if type(data) is not dict:
                raise errors.bad_json("expected a JSON object")
            sid = data.get("session_id")
        if sid is None:
            # Minted ids are 32 hex digits: no escaping needed.
            return raw_json_response(b'{"session_id":"%s"}' % (await sessions.mint()).encode())
        await sessions.create(sid)
        return json_response({"session_id": sid})

    async def get_session(request: Request) -> Response:
        sid = request.route_values["id"]
        session = sessions.lookup(sid)
        check = tito_check.requested(state.tito, request)
        if session is NEVER_SEEN:
            return json_response(empty_snapshot(sid))
        if session is DELETED:
            raise errors.session_not_found(sid)
        if settings.trajectory == "tree":  # a forest: forest_api
            return await get_tree(state, sid, session, request)
        traj, answers = await sessions.read(sid, session)
        head = b'{"session_id":%s,"records":[' % orjson.dumps(sid)
        extra = await tito_check.metadata_entry(state.tito, traj) if check else None  # type: ignore[arg-type]
        tail = b'],"metadata":%s}' % metadata(traj, state.max_trim_tokens, extra)
        if traj is None or traj.num_turns == 0:
            return raw_json_response(head + tail)

        async def body() -> AsyncIterator[bytes]:
            # A session's JSON in pieces of about one record: a large
            # trajectory is never built as one bytes object.
            yield head
            for k, record in enumerate(traj.records(CHAT_PATH, answers)):
                yield record if k == 0 else b"," + record
            yield tail

        return Response(200, None, StreamedContent(JSON_TYPE, body))

    async def delete_session(request: Request) -> Response:
        cancelled = await sessions.delete(request.route_values["id"])
        state.metrics.upstream_cancelled += cancelled
        return Response(204)

    create_ep = document(
        docs,
        endpoint(state, "POST", "/sessions", create_session),
        summary="Create a session",
        description="Mint a new id, or create under the id of an optional body "
        '`{"session_id": "<id>"}`.',
        tags=["sessions"],
        responses={
            200: '`{"session_id": "<id>"}`',
            400: "invalid id or malformed JSON",
            404: "the id was deleted",
            409: "the id is live",
            413: "body too large",
        },
    )
    get_ep = document(
        docs,
        endpoint(state, "GET", "/sessions/{id}", get_session),
        summary="Read a session's trajectory",
        tags=["sessions"],
        parameters=ID_PARAM,
        responses={
            200: '`{"session_id", "records", "metadata"}`; a never-seen id reads empty',
            400: "invalid id",
            404: "the id was deleted",
        },
    )
    delete_ep = document(
        docs,
        endpoint(state, "DELETE", "/sessions/{id}", delete_session),
        summary="Delete a session",
        description="The id never comes back: later chat, GET and DELETE of it answer 404. "
        "Turns of the session waiting for the backend are cancelled (their upstream "
        "connections closed) and answer 404, unless CANCEL_ON_DELETE is off.",
        tags=["sessions"],
        parameters=ID_PARAM,
        responses={204: "deleted", 400: "invalid id", 404: "unknown, deleted or closing"},
    )
    app.router.add_post("/sessions", create_ep)
    router: SessionRouter = app.router  # type: ignore[assignment]
    router.add_by_id("GET", get_ep)
    router.add_by_id("DELETE", delete_ep)
