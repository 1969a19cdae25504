"""``POST /sessions/{id}/samples``: a session's training samples.

What a trainer wants instead of re-parsing records, linear in the
trajectory's size (records are quadratic): ``tokens`` (int32), ``loss_mask``
(uint8, 1 on generated tokens), ``rollout_log_probs`` (float32, 0 where the
mask is 0) and ``offsets`` (int64, k+1 entries), concatenated over the
samples: one sample of the trajectory in linear mode, one per kept leaf in
tree mode (``samples``, ``forest_api``). Metadata: ``session_id``,
``samples`` (one object per sample) and, in linear mode, the single
sample's ``num_assistant``, ``turns``, ``length``, ``truncated`` (and
``original_length``) at the top level.

The answer is ``application/octet-stream`` safetensors (the metadata in its
``__metadata__``, values as JSON text), or JSON lists with ``Accept:
application/json``. Body: ``{}`` or any of ``max_seq_len``, ``reward``,
``metadata``. A deleted id is 404; a never-seen id answers no sample and
nothing is created.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import orjson
from blacksheep import Application, Request, Response
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions import errors
from rollout_sessions.forest_api import tree_export
from rollout_sessions.openapi import ID_PARAM, document
from rollout_sessions.registry import DELETED, NEVER_SEEN, validate_id
from rollout_sessions.samples import (
    answers_needed,
    linear_samples,
    parse_body,
    safetensors_bytes,
)
from rollout_sessions.session import Session
from rollout_sessions.store import Trajectory
from rollout_sessions.web import JSON_TYPE, endpoint, id_checked, read_body, whole

if TYPE_CHECKING:
    from rollout_sessions.state import AppState

SAFETENSORS_TYPE = b"application/octet-stream"
SAMPLES_PATH = "/samples"


async def _read(
    state: AppState, sid: str, session: Session
) -> tuple[Trajectory, list[array] | None, dict[int, bytes] | None]:
    """The trajectory (a snapshot) and, when the journal keeps them, its logprobs
    and the answers the export must read (``samples.answers_needed``)."""
    journal = state.journal
    async with session.lock:  # no turn of this session is being written meanwhile
        traj = session.trajectory
        if journal is None:
            return traj.snapshot_with_logprobs(), None, None
        snapshot = traj.snapshot()
        key = state.registry.key_of(sid)
        pending = journal.logprobs(key)
        needed = answers_needed(snapshot)
        pending_answers = journal.turn_answers(key, needed) if needed else None
    logprobs = await pending
    answers = dict(zip(needed, await pending_answers, strict=True)) if needed else None
    return snapshot, logprobs, answers


def _wants_json(request: Request) -> bool:
    accept = request.get_first_header(b"accept") or b""
    return b"application/json" in accept.lower()


def add_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    settings = state.settings
    lookup = state.registry.lookup

    async def samples(request: Request) -> Response:
        sid = request.route_values["id"]
        id_checked(validate_id, sid)
        req = parse_body(
            await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
        )
        session = lookup(sid)
        if session is DELETED:
            raise errors.session_not_found(sid)
        if settings.trajectory == "tree":  # one sample per kept leaf: forest_api
            live = session if session is not NEVER_SEEN else None
            arrays, meta = await tree_export(state, sid, live, req)
        else:
            traj, logprobs, answers = None, None, None
            if session is not NEVER_SEEN and session.traj is not None:
                traj, logprobs, answers = await _read(state, sid, session)
            arrays, meta = linear_samples(sid, traj, req, logprobs, answers)
        if _wants_json(request):
            body = orjson.dumps({**{k: v.tolist() for k, v in arrays.items()}, "metadata": meta})
            return Response(200, None, whole(JSON_TYPE, body))
        text_meta = {k: v if type(v) is str else orjson.dumps(v).decode() for k, v in meta.items()}
        return Response(200, None, whole(SAFETENSORS_TYPE, safetensors_bytes(arrays, text_meta)))

    ep = document(
        docs,
        endpoint(state, "POST", "/sessions/{id}" + SAMPLES_PATH, samples),
        summary="The session's training samples",
        description="One sample of the trajectory (linear mode) or one per kept leaf (tree "
        "mode): safetensors (`tokens` int32, `loss_mask` uint8, `rollout_log_probs` float32, "
        "`offsets` int64, routing-replay arrays when recorded; metadata) or JSON with "
        '`Accept: application/json`. Body `{}` or any of `{"max_seq_len": n, "reward": x, '
        '"metadata": {...}}`.',
        tags=["sessions"],
        parameters=ID_PARAM,
        responses={
            200: "the samples; a never-seen id gives none",
            400: "invalid id or body",
            404: "the id was deleted",
        },
    )
    app.router.add_post("/sessions/{id}" + SAMPLES_PATH, ep)
