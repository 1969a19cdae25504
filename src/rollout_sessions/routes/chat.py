"""``POST /sessions/{id}/v1/chat/completions``: one chat turn through a session.

The split lock:

1. look the session up (404 if deleted or closing); read, parse and check
   the body (400 on bad JSON or wrong types), force the SGLang flags the
   trajectory needs; only then auto-create a never-seen id, so a bad
   request creates nothing;
2. under ``session.lock``, briefly: check the messages against the stored
   trajectory (``trajectory.plan_turn``: extension, or a retry of at most one
   assistant step) and remember the store's version;
3. without any lock: with token-in, token-out on, build ``input_ids``
   (``tito``); then the upstream call. Non-200 answers pass through
   unrecorded, transport failures are 502, timeouts 504, defects of the
   answer 502 naming them (``answer.parse_answer``; an answer nested too
   deep to be written again too: what the store and the client get is
   made here, ``_checked``);
4. ``Sessions.record``, under the lock again: if the session is closing or
   another turn was recorded meanwhile, answer without recording; else
   check the stored checkpoint is a prefix of the new token ids (500 if
   not; with TITO it is the ``input_ids`` sent, and an answer whose prompt
   differs was already a 502 after step 3) and record, journal first.

The upstream call is never made under the lock, so a DELETE never waits
for one; with ``CANCEL_ON_DELETE`` (``controls.InFlight``) the DELETE
cancels it, and the turn answers 404 unrecorded (the service's rules
say the rest: what is answered is durable).

``run_turn`` is steps 2-4 for a request already read and checked, so
another protocol translated to a chat request (``routes/messages.py``,
Anthropic Messages) is driven by the same turn; ``ChatRequest``'s three hooks
(``align``, ``client_answer``, ``upstream_refused``) are where it differs.

``stream: true`` is served from the complete upstream answer (the backend
is always called without streaming: the trajectory needs the whole answer
and its token ids) as a short, valid SSE stream. Routing-replay
payloads (``meta_info.routed_experts``, ``meta_info.indexer_topk``) stay in
the record and are removed from the client's answer.
"""

from __future__ import annotations

import time
from array import array
from typing import TYPE_CHECKING, Any

from blacksheep import Application, Request, Response
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions.registry import NEVER_SEEN
from rollout_sessions.routes.forest_chat import choices_requested, tree_turn
from rollout_sessions.routes.relay import client_headers
from rollout_sessions.routes.turn import (
    ChatRequest,
    CheckedAnswer,
    ask,
    checked_answer,
    first_difference,
    first_turn_ids,
    is_prefix,
)
from rollout_sessions.sessions.service import CLOSING, Change
from rollout_sessions.trajectory.rules import Plan, plan_turn
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import (
    endpoint,
    query_string,
    read_body,
)
from rollout_sessions.web.openapi import ID_PARAM, document
from rollout_sessions.web.routing import CHAT_PATH

if TYPE_CHECKING:
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.tito import Tito
    from rollout_sessions.web.state import AppState


CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a turn's outcome: its prompt left the trajectory


async def chat_completions(state: AppState, session_id: str, request: Request) -> Response:
    """One chat turn; raises ``ApiError`` for every error answer."""
    arrived = time.time()
    session = state.sessions.live_for_turn(session_id)
    settings = state.settings
    turn = ChatRequest(
        await read_body(request, settings.max_body_bytes, settings.header_timeout_s),
        arrived,
        state.overrides,
    )
    return await run_turn(
        state, session_id, session, turn, client_headers(request), query_string(request)
    )


async def run_turn(
    state: AppState,
    session_id: str,
    session: Any,
    turn: ChatRequest,
    headers: list[tuple[str, str]],
    query: str,
) -> Response:
    """Steps 2-4 for a checked request (``session`` from
    ``Sessions.live_for_turn``); ``headers`` and ``query`` go upstream with it."""
    sessions = state.sessions
    settings = state.settings
    n = choices_requested(turn.req, settings.trajectory)  # n > 1 only in tree mode
    tito = state.tito
    first_ids = None
    if session is NEVER_SEEN:
        if tito is not None:  # rendered before creating: a template error creates nothing
            first_ids = first_turn_ids(tito, turn)
        session = sessions.auto_create(session_id)
    if settings.trajectory == "tree":  # always-branch: forest_chat
        return await tree_turn(state, session_id, session, turn, n, first_ids, headers, query)

    plan, base, last_assistant = await _planned(session, session_id, turn, settings)
    input_ids = None
    if tito is not None:
        input_ids = _input_ids(tito, turn, plan, base, last_assistant, first_ids)
    answer = await ask(state, session, session_id, turn, input_ids, headers, query)
    if answer.status != 200:
        state.metrics.chat_turns.inc("upstream_status")
        return turn.upstream_refused(answer)
    checked = checked_answer(state, turn, answer.body, input_ids)
    if base is not None and len(checked.prompt_ids) < len(base):
        # Tokens of the stored trajectory would be recorded as generated
        # again: the new turn's span would overlap the previous completion.
        state.metrics.upstream_errors.inc("malformed")
        raise errors.upstream_prompt_short(len(checked.prompt_ids), len(base))

    def prepare(traj: Trajectory) -> Change | str:
        # With TITO the prompt was built on the checkpoint and the upstream echoed
        # it: the prefix holds by construction.
        if base is not None and input_ids is None and not is_prefix(base, checked):
            return CHECKPOINT_MISMATCH
        write = traj.prepare(
            keep=plan.keep,
            exact=plan.exact,
            message_bytes=turn.message_bytes,
            assistant=checked.assistant,
            rest=turn.rest,
            with_input_ids=input_ids is not None,
            prompt=checked.prompt_ids,
            completion=checked.completion_ids,
            logprobs=checked.logprobs,
            answer=checked.answer,
            cut=checked.cut,
            timestamps=(time.time(), turn.arrived),
            extras=checked.extras,
        )
        return sessions.linear_change(session_id, traj, write)

    outcome = await sessions.record(session_id, session, plan.version, prepare)
    state.metrics.chat_turns.inc(outcome)
    if outcome == CLOSING and sessions.inflight is not None and session.closing:
        # Deleted after its answer came: answered like a turn the DELETE cancelled.
        raise errors.session_not_found(session_id)
    if outcome == CHECKPOINT_MISMATCH:
        raise errors.checkpoint_mismatch(*_mismatch(base, checked))  # type: ignore[arg-type]
    return checked.client


async def _planned(
    session: Session, session_id: str, turn: ChatRequest, settings: Any
) -> tuple[Plan, array | None, dict[str, Any] | None]:
    """Step 2, under the lock: the plan, the checkpoint it builds on and the
    stored assistant message that checkpoint ends with."""
    async with session.lock:
        if session.closing:
            raise errors.session_not_found(session_id)
        traj = session.traj
        turn.align(traj)
        plan = plan_turn(traj, turn.messages, turn.message_bytes, settings.allowed_append_roles)
        base = traj.checkpoint(plan.keep) if traj is not None and plan.keep else None
        last_assistant = traj.message(traj.message_end(plan.keep - 1) - 1) if base else None
    return plan, base, last_assistant


def _input_ids(
    tito: Tito,
    turn: ChatRequest,
    plan: Plan,
    base: array | None,
    last_assistant: dict[str, Any] | None,
    first_ids: array | None,
) -> array:
    if base is None:
        return first_ids if first_ids is not None else first_turn_ids(tito, turn)
    return tito.next_turn(
        base,
        last_assistant,  # type: ignore[arg-type]
        turn.messages[plan.tail_start :],
        turn.req.get("tools"),
        turn.req.get("chat_template_kwargs"),
        plan.tail_start,
    )


async def prompt_ids(state: AppState, session_id: str, session: Any, turn: ChatRequest) -> array:
    """The ``input_ids`` this turn would send (TITO on), changing nothing:
    ``session`` from ``Sessions.live_for_turn``; 400 where the turn would be refused."""
    tito = state.tito
    assert tito is not None
    if session is NEVER_SEEN or session.traj is None:
        return first_turn_ids(tito, turn)
    plan, base, last_assistant = await _planned(session, session_id, turn, state.settings)
    return _input_ids(tito, turn, plan, base, last_assistant, None)


def _mismatch(base: array, checked: CheckedAnswer) -> tuple[int, int, int]:
    tokens = checked.prompt_ids + checked.completion_ids
    return len(base), len(tokens), first_difference(base, tokens)


def add_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    """``POST /sessions/{id}/v1/chat/completions``."""

    async def chat_route(request: Request) -> Response:
        return await chat_completions(state, request.route_values["id"], request)

    chat_ep = document(
        docs,
        endpoint(state, "POST", "/sessions/{id}" + CHAT_PATH, chat_route),
        summary="Chat turn through a session",
        description="Forwarded to the upstream and recorded in the trajectory. A never-seen "
        "id is auto-created; a deleted or closing one answers 404.",
        tags=["chat"],
        parameters=ID_PARAM,
        responses={
            200: "the upstream answer (JSON, or SSE when `stream: true`)",
            400: "invalid id, malformed JSON or a trajectory that does not extend the session",
            404: "deleted or closing",
            413: "body too large",
            502: "backend transport error or malformed backend answer",
            504: "backend timeout",
        },
    )
    app.router.add_post("/sessions/{id}" + CHAT_PATH, chat_ep)
