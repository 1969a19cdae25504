"""Reading a forest over HTTP (tree mode): ``GET /sessions/{id}`` and the samples export.

``GET /sessions/{id}``: ``records`` is the active path (root to the node
committed or attached to last), so a harness written for linear sessions
reads what it always did; ``metadata`` adds ``tree`` (every node, the
leaves, the active leaf). ``?records=all``: every node's record in id
order, each with ``node_id`` and ``parent``.

A read fixes the node count under the session lock; the forest is
append-only, so later commits never change what it streams. With the
journal on, the answers (and logprobs) are read from it, queued while the
lock is held: exactly the nodes of that count.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Request, Response, StreamedContent

from rollout_sessions.trajectory import forest_rules
from rollout_sessions.trajectory.forest import REPLAY, Forest
from rollout_sessions.trajectory.samples import SamplesRequest, tree_samples
from rollout_sessions.trajectory.store import ids_json
from rollout_sessions.web.endpoints import JSON_TYPE, raw_json_response
from rollout_sessions.web.routing import CHAT_PATH

if TYPE_CHECKING:
    from rollout_sessions.journal.writer import Journal
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.web.state import AppState


def _wants_all(request: Request) -> bool:
    values = request.query.get("records")
    return bool(values) and values[-1] == "all"


async def get_tree(state: AppState, sid: str, session: Session, request: Request) -> Response:
    forest = session.traj
    every = _wants_all(request)
    answers: dict[int, bytes] | None = None
    wanted: list[int] | None = None

    def take(forest: Any) -> tuple[int, int]:
        return (forest.n_nodes, forest.active) if forest is not None else (0, -1)

    def reads(journal: Journal, key: bytes, counted: tuple[int, int]) -> list[Any]:
        nonlocal wanted  # every node's answer, or the active path's only
        if not counted[0]:
            return [None]
        wanted = None if every else forest_rules.path(forest.parents, counted[1])  # type: ignore[union-attr]
        return [journal.node_answers(key, wanted)]

    (n, active), read = await state.sessions.snapshot(sid, session, take, reads)
    if read is not None and n:
        answers = dict(zip(range(n) if wanted is None else wanted, read[0], strict=True))
    assert forest is None or isinstance(forest, Forest)
    if forest is None or n == 0:
        tree = {"nodes": [], "leaves": [], "active_leaf": None}
        meta = {
            "accumulated_token_ids": [],
            "num_assistant": 0,
            "max_trim_tokens": state.max_trim_tokens,
            "tree": tree,
        }
        return raw_json_response(
            b'{"session_id":%s,"records":[],"metadata":%s}'
            % (orjson.dumps(sid), orjson.dumps(meta))
        )
    active_path = forest_rules.path(forest.parents, active) if active >= 0 else []
    tokens = forest.path_tokens(active) if active >= 0 else array("i")
    meta_bytes = orjson.dumps(
        {
            "accumulated_token_ids": orjson.Fragment(ids_json(tokens)),
            "num_assistant": len(active_path),
            "max_trim_tokens": state.max_trim_tokens,
            "tree": forest.tree(n, active),
        }
    )
    nodes = list(range(n)) if every else active_path
    head = b'{"session_id":%s,"records":[' % orjson.dumps(sid)
    tail = b'],"metadata":%s}' % meta_bytes

    async def body() -> AsyncIterator[bytes]:
        yield head
        for i, record in enumerate(forest.records(CHAT_PATH, nodes, answers, every)):
            yield record if i == 0 else b"," + record
        yield tail

    return Response(200, None, StreamedContent(JSON_TYPE, body))


async def tree_export(
    state: AppState, sid: str, session: Session | None, req: SamplesRequest
) -> tuple[dict, dict]:
    """The samples of a tree session (``samples.tree_samples``)."""
    forest = session.traj if session is not None else None
    if forest is None:
        return tree_samples(sid, None, 0, -1, state.settings.sample_picker, req)
    assert isinstance(forest, Forest)
    logprobs: list[array] | None = None
    answers: dict[int, bytes] | None = None
    with_replay: list[int] = []

    def take(forest: Forest) -> tuple[int, int]:
        return forest.n_nodes, forest.active

    def reads(journal: Journal, key: bytes, counted: tuple[int, int]) -> list[Any]:
        with_replay.extend(k for k in range(counted[0]) if forest.flags[k] & REPLAY)
        return [
            journal.node_logprobs(key),
            journal.node_answers(key, with_replay) if with_replay else None,
        ]

    (n, active), read = await state.sessions.snapshot(sid, session, take, reads)  # type: ignore[arg-type]
    if read is not None:
        logprobs = read[0]
        if read[1] is not None:
            answers = dict(zip(with_replay, read[1], strict=True))
    return tree_samples(
        sid, forest, n, active, state.settings.sample_picker, req, logprobs, answers
    )
