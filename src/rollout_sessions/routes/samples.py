"""``POST /sessions/{id}/samples``: a session's trajectory as one training sample.

What a trainer wants instead of re-parsing records, linear in the
trajectory's size (records are quadratic):

- ``tokens`` (int32): the trajectory, every prompt and completion once;
- ``loss_mask`` (uint8): 1 on generated tokens, 0 on prompt and tool tokens;
- ``rollout_log_probs`` (float32): the sampler's logprob of each generated
  token, 0 where the mask is 0;
- metadata: ``session_id``, ``num_assistant``, ``turns`` (each turn's
  ``[completion_start, completion_end)`` in ``tokens``), ``length``, and, when
  ``max_seq_len`` cut it, ``truncated: true`` with the ``original_length``.

The answer is ``application/octet-stream`` safetensors (the metadata in its
``__metadata__``, values as JSON text; the same trajectory gives the same
bytes in any process), or JSON lists when ``Accept`` names
``application/json`` with q > 0, at least as preferred as safetensors.
Body: ``{}`` or ``{"max_seq_len": n}``. A deleted id is 404; a never-seen
id answers an empty sample and nothing is created.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from blacksheep import Application, Request, Response
from blacksheep.server.openapi.v3 import OpenAPIHandler
from safetensors.numpy import save

from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import JSON_TYPE, endpoint, parse_json, read_body, whole
from rollout_sessions.web.openapi import ID_PARAM, document

if TYPE_CHECKING:
    from rollout_sessions.web.state import AppState

SAFETENSORS_TYPE = b"application/octet-stream"
SAMPLES_PATH = "/samples"


def sample(
    session_id: str,
    traj: Trajectory | None,
    max_seq_len: int | None,
    logprobs: list[array] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the metadata of a session's training sample."""
    if traj is None or traj.num_turns == 0:
        tokens = np.zeros(0, dtype=np.int32)
        mask = np.zeros(0, dtype=np.uint8)
        values = np.zeros(0, dtype=np.float32)
        turns: list[list[int]] = []
    else:
        tokens, mask, values, turns = traj.sample_arrays(logprobs)
    meta: dict[str, Any] = {
        "session_id": session_id,
        "num_assistant": len(turns),
        "turns": turns,
        "length": len(tokens),
        "truncated": False,
    }
    if max_seq_len is not None and len(tokens) > max_seq_len:
        meta.update(truncated=True, original_length=len(tokens), length=max_seq_len)
        tokens, mask, values = tokens[:max_seq_len], mask[:max_seq_len], values[:max_seq_len]
        meta["turns"] = [[a, min(b, max_seq_len)] for a, b in turns if a < max_seq_len]
        meta["num_assistant"] = len(meta["turns"])  # the turns the sample still holds
    arrays = {"tokens": tokens, "loss_mask": mask, "rollout_log_probs": values}
    return arrays, meta


def safetensors_bytes(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """``arrays`` and ``meta`` (values as JSON text) as safetensors, the same
    bytes for the same input in every process.

    safetensors keeps ``__metadata__`` in a hash map seeded per process, so
    its key order, and the file's bytes, change from run to run. The header
    is written again here: the metadata in ``meta``'s order, the tensors in
    the order of their data, padded with spaces so the data stays 8-byte
    aligned; the data itself is the library's, untouched (its offsets are
    relative to the end of the header).
    """
    text = {k: v if type(v) is str else orjson.dumps(v).decode() for k, v in meta.items()}
    raw = save(arrays, metadata=text)
    size = int.from_bytes(raw[:8], "little")
    header = orjson.loads(raw[8 : 8 + size])
    del header["__metadata__"]
    tensors = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
    head = orjson.dumps({"__metadata__": text, **dict(tensors)})
    head += b" " * (-len(head) % 8)
    return b"".join((len(head).to_bytes(8, "little"), head, memoryview(raw)[8 + size :]))


def _max_seq_len(body: bytes) -> int | None:
    if not body:
        return None
    data = parse_json(body)
    if type(data) is not dict:
        raise errors.bad_json("expected a JSON object")
    value = data.get("max_seq_len")
    if value is not None and (type(value) is not int or value < 1):
        raise errors.invalid_samples_request("max_seq_len must be a positive integer")
    return value


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
        max_seq_len = _max_seq_len(
            await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
        )
        session = sessions.lookup(sid)
        if session is DELETED:
            raise errors.session_not_found(sid)
        traj, logprobs = None, None
        if session is not NEVER_SEEN and session.traj is not None:
            traj, logprobs = await sessions.read_with_logprobs(sid, session)
        arrays, meta = sample(sid, traj, max_seq_len, logprobs)
        if _wants_json(request):
            body = orjson.dumps({**{k: v.tolist() for k, v in arrays.items()}, "metadata": meta})
            return Response(200, None, whole(JSON_TYPE, body))
        return Response(200, None, whole(SAFETENSORS_TYPE, safetensors_bytes(arrays, meta)))

    ep = document(
        docs,
        endpoint(state, "POST", "/sessions/{id}" + SAMPLES_PATH, samples),
        summary="The trajectory as a training sample",
        description="safetensors (`tokens` int32, `loss_mask` uint8, `rollout_log_probs` "
        "float32, metadata) or JSON with `Accept: application/json`. Body `{}` or "
        '`{"max_seq_len": n}`.',
        tags=["sessions"],
        parameters=ID_PARAM,
        responses={
            200: "the sample; a never-seen id gives an empty one",
            400: "invalid id or body",
            404: "the id was deleted",
        },
    )
    app.router.add_post("/sessions/{id}" + SAMPLES_PATH, ep)
