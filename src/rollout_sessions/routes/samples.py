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
``__metadata__``, values as JSON text; the same trajectory gives the same
bytes in any process), or JSON lists when ``Accept`` names
``application/json`` with q > 0, at least as preferred as safetensors.
Body: ``{}`` or any of ``max_seq_len``, ``reward``, ``metadata``. A deleted
id is 404; a never-seen id answers no sample and nothing is created.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Application, Request, Response
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.routes.forest_api import tree_export
from rollout_sessions.trajectory.samples import (
    answers_needed,
    linear_samples,
    parse_body,
    safetensors_bytes,
)
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import JSON_TYPE, endpoint, read_body, whole
from rollout_sessions.web.openapi import ID_PARAM, document

if TYPE_CHECKING:
    from rollout_sessions.journal.writer import Journal
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.web.state import AppState

SAFETENSORS_TYPE = b"application/octet-stream"
SAMPLES_PATH = "/samples"


async def _read(
    state: AppState, sid: str, session: Session
) -> tuple[Trajectory, list[array] | None, dict[int, bytes] | None]:
    """The trajectory (a snapshot) and, when the journal keeps them, its logprobs
    and the answers the export must read (``samples.answers_needed``)."""
    needed: list[int] = []

    def reads(journal: Journal, key: bytes, snapshot: Trajectory) -> list[Any]:
        needed.extend(answers_needed(snapshot))
        return [journal.logprobs(key), journal.turn_answers(key, needed) if needed else None]

    take = _snapshot if state.sessions.journal is not None else _snapshot_with_logprobs
    snapshot, read = await state.sessions.snapshot(sid, session, take, reads)
    if read is None:
        return snapshot, None, None
    logprobs, answers = read
    return snapshot, logprobs, dict(zip(needed, answers, strict=True)) if needed else None


def _snapshot(traj: Trajectory) -> Trajectory:
    return traj.snapshot()


def _snapshot_with_logprobs(traj: Trajectory) -> Trajectory:  # no journal keeps them
    return traj.snapshot_with_logprobs()


def media_ranges(accept: bytes) -> list[tuple[bytes, float]]:
    """An ``Accept`` value as ``(range, quality)`` pairs, ranges lowercase
    (``type/subtype``, ``type/*`` or ``*/*``), parameters other than ``q`` dropped."""
    ranges = []
    for item in accept.lower().split(b","):
        name, *params = item.split(b";")
        name = name.strip()
        if not name:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition(b"=")
            if key.strip() == b"q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0  # unreadable: not a preference to honour
        ranges.append((name, quality))
    return ranges


def quality(ranges: list[tuple[bytes, float]], media_type: bytes) -> float | None:
    """The quality ``ranges`` give ``media_type``: that of the most specific
    range matching it (RFC 9110, 12.5.1); ``None`` when none matches."""
    kind = media_type.split(b"/", 1)[0] + b"/*"
    best: tuple[int, float] | None = None
    for name, q in ranges:
        rank = 3 if name == media_type else 2 if name == kind else 1 if name == b"*/*" else 0
        if rank and (best is None or rank > best[0]):
            best = (rank, q)
    return None if best is None else best[1]


def _wants_json(request: Request) -> bool:
    """JSON when the client names ``application/json`` itself (a wildcard only
    ever means the default, safetensors), acceptable (q > 0), and preferred
    at least as much as safetensors."""
    accept = b",".join(request.get_headers(b"accept"))
    if not accept:
        return False
    ranges = media_ranges(accept)
    json_q = next((q for name, q in ranges if name == JSON_TYPE), 0.0)
    binary_q = quality(ranges, SAFETENSORS_TYPE)
    return json_q > 0 and (binary_q is None or json_q >= binary_q)


def add_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    settings = state.settings
    sessions = state.sessions

    async def samples(request: Request) -> Response:
        sid = request.route_values["id"]
        sessions.check_id(sid)
        req = parse_body(
            await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
        )
        session = sessions.lookup(sid)
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
