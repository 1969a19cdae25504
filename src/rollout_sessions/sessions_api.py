"""The session lifecycle: ``POST /sessions``, ``GET`` and ``DELETE /sessions/{id}``.

- ``POST /sessions``: mint an id, or with a body ``{"session_id": id}``
  create under that id (409 if live, 404 if deleted, 400 if invalid);
- ``GET /sessions/{id}``: the trajectory; a never-seen id reads empty and
  stays unknown (restart tolerance); a deleted id is 404;
- ``DELETE /sessions/{id}``: 204; unknown, deleted or closing is 404. The
  session is marked closing first (a chat turn arriving meanwhile gets 404),
  then removed under its lock, which is held only for a turn's short locked
  steps, never across an upstream call. The id never comes back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from blacksheep import Application, Request, Response, StreamedContent
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions import errors
from rollout_sessions.errors import ApiError
from rollout_sessions.forest_api import get_tree
from rollout_sessions.openapi import ID_PARAM, document
from rollout_sessions.registry import CREATED, DELETED, LIVE, NEVER_SEEN
from rollout_sessions.routing import CHAT_PATH, SessionRouter
from rollout_sessions.session import Session, empty_snapshot, metadata
from rollout_sessions.store import Trajectory
from rollout_sessions.web import (
    JSON_TYPE,
    endpoint,
    id_checked,
    json_response,
    parse_json,
    raw_json_response,
    read_body,
)

if TYPE_CHECKING:
    from rollout_sessions.state import AppState


async def read_trajectory(
    state: AppState, sid: str, session: Session
) -> tuple[Trajectory | None, list[bytes] | None]:
    """A snapshot of a session's trajectory, and its answers when the journal keeps them.

    The journal's read is queued while the session lock is held, so it sees
    exactly the turns of the snapshot: no turn of this session is being
    written meanwhile (a turn holds the lock until its write is committed).
    """
    traj = session.traj
    if traj is None:
        return None, None
    journal = state.journal
    if journal is None:
        return traj.snapshot(), None
    async with session.lock:
        traj = session.traj
        snapshot = traj.snapshot() if traj is not None else None
        pending = journal.answers(state.registry.key_of(sid))
    return snapshot, await pending


def add_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    registry = state.registry
    settings = state.settings
    journal = state.journal
    create, lookup, remove = registry.create, registry.lookup, registry.remove

    async def mint() -> str:
        if journal is None:
            return registry.mint(Session())
        # An id is handed out only below the reservation on disk.
        while (reserving := journal.reserve_mints(registry.mint_counter)) is not None:
            try:
                await reserving
            except ApiError as exc:
                raise errors.minting_unavailable(exc.message) from None
        sid = registry.mint(Session())
        try:
            await journal.create(registry.key_of(sid), sid, "minted")
        except ApiError:
            remove(sid)  # never handed out; ours, so no tombstone either
            raise
        return sid

    async def create_by_id(sid: str) -> None:
        if journal is not None:
            # Journaled first: an id answered as created survives a restart.
            current = id_checked(lookup, sid)
            if current is DELETED:
                raise errors.session_not_found(sid)
            if current is not NEVER_SEEN:
                raise errors.session_exists(sid)
            await journal.create(registry.key_of(sid), sid, "by_id")
        outcome = id_checked(create, sid, Session())
        if outcome is LIVE:
            raise errors.session_exists(sid)
        if outcome is not CREATED:  # deleted meanwhile: it stays deleted on disk too
            if journal is not None:
                journal.expire(registry.key_of(sid))
            raise errors.session_not_found(sid)

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
            return raw_json_response(b'{"session_id":"%s"}' % (await mint()).encode())
        await create_by_id(sid)
        return json_response({"session_id": sid})

    async def get_session(request: Request) -> Response:
        sid = request.route_values["id"]
        session = id_checked(lookup, sid)
        if session is NEVER_SEEN:
            return json_response(empty_snapshot(sid))
        if session is DELETED:
            raise errors.session_not_found(sid)
        if settings.trajectory == "tree":  # a forest: forest_api
            return await get_tree(state, sid, session, request)
        traj, answers = await read_trajectory(state, sid, session)
        head = b'{"session_id":%s,"records":[' % orjson.dumps(sid)
        tail = b'],"metadata":%s}' % metadata(traj, state.max_trim_tokens)
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
        sid = request.route_values["id"]
        session = id_checked(lookup, sid)
        if session is NEVER_SEEN or session is DELETED or session.closing:
            raise errors.session_not_found(sid)
        session.closing = True  # from here a chat turn answers 404
        try:
            # A session that never chatted has no lock: don't create one just
            # to delete it (idle sessions stay allocation-free).
            lock = session.lock_if_any
            if lock is None:
                await forget(sid, session)
            else:
                async with lock:  # waits for a turn's locked steps, never its upstream call
                    await forget(sid, session)
        except ApiError:
            session.closing = False  # nothing changed
            raise
        return Response(204)

    async def forget(sid: str, session: Session) -> None:
        if journal is not None:
            foreign = not registry.is_self_minted(sid)
            await journal.delete(registry.key_of(sid), foreign)
        remove(sid, expected=session)

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
        description="The id never comes back: later chat, GET and DELETE of it answer 404.",
        tags=["sessions"],
        parameters=ID_PARAM,
        responses={204: "deleted", 400: "invalid id", 404: "unknown, deleted or closing"},
    )
    app.router.add_post("/sessions", create_ep)
    router: SessionRouter = app.router  # type: ignore[assignment]
    router.add_by_id("GET", get_ep)
    router.add_by_id("DELETE", delete_ep)
