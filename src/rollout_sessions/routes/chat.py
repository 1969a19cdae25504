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

import asyncio
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Application, Request, Response
from blacksheep.server.openapi.v3 import OpenAPIHandler

from rollout_sessions.registry import NEVER_SEEN
from rollout_sessions.routes.forest_chat import choices_requested, tree_turn
from rollout_sessions.routes.relay import client_headers, passthrough
from rollout_sessions.sessions.service import CLOSING, Change
from rollout_sessions.trajectory.rules import Plan, plan_turn
from rollout_sessions.trajectory.store import Trajectory, cut_prompt_ids, ids_json
from rollout_sessions.upstream.answer import REPLAY_KEYS, ParsedAnswer, parse_answer, sse_body
from rollout_sessions.upstream.client import Answer
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import (
    JSON_TYPE,
    endpoint,
    parse_json,
    query_string,
    read_body,
    whole,
)
from rollout_sessions.web.errors import ApiError
from rollout_sessions.web.openapi import ID_PARAM, document
from rollout_sessions.web.routing import CHAT_PATH

if TYPE_CHECKING:
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.tito import Tito
    from rollout_sessions.upstream.controls import InFlight, Overrides
    from rollout_sessions.web.state import AppState

SSE_TYPE = b"text/event-stream"
CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a turn's outcome: its prompt left the trajectory
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

# What the trajectory needs from the backend, forced on every turn: the
# client cannot switch it off.
FORCED_FLAGS: dict[str, bool] = {
    "logprobs": True,
    "return_prompt_token_ids": True,
    "return_meta_info": True,
    "no_stop_trim": False,
}

# Fields the trajectory reads, with the JSON types they may have (absent is None).
_MESSAGE_FIELDS = (
    ("role", {str}),
    ("content", {str, list, type(None)}),
    ("reasoning_content", {str, type(None)}),
    ("tool_calls", {list, type(None)}),
)
_REQUEST_FIELDS = (
    ("tools", {list, type(None)}),
    ("stream", {bool, type(None)}),
    ("stream_options", {dict, type(None)}),
    ("chat_template_kwargs", {dict, type(None)}),
)


class ChatRequest:
    """One chat request, checked and ready to forward."""

    __slots__ = ("req", "messages", "message_bytes", "rest", "stream", "arrived")

    def __init__(
        self, body: bytes | dict[str, Any], arrived: float, overrides: Overrides | None = None
    ) -> None:
        # A dict: a request another protocol was translated to (messages.py).
        req = body if type(body) is dict else parse_json(body)
        _check_request(req)
        self.arrived = arrived
        self.stream = bool(req.pop("stream", False))
        req.pop("stream_options", None)
        req.pop("input_ids", None)  # built here when TITO is on, never the client's
        req.update(FORCED_FLAGS)
        if overrides is not None:  # SAMPLING_OVERRIDES: over the client's values
            overrides.apply(req)
        self.req = req
        self.messages: list[dict[str, Any]] = req["messages"]
        try:
            self.message_bytes = [orjson.dumps(m) for m in self.messages]
            others = {k: v for k, v in req.items() if k != "messages"}
            self.rest = orjson.dumps(others)[1:-1]
        except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than orjson writes
            raise errors.invalid_chat_request(f"the body cannot be forwarded: {exc}") from None

    def upstream_body(self, input_ids: array | None) -> bytes:
        """The forwarded body: the other fields, the messages, then ``input_ids``."""
        parts = [b"{", self.rest, b',"messages":[', b",".join(self.message_bytes), b"]"]
        if not self.rest:
            parts[2] = b'"messages":['
        if input_ids is not None:
            parts += [b',"input_ids":', ids_json(input_ids)]
        parts.append(b"}")
        return b"".join(parts)

    # A protocol translated to a chat turn (messages.py) overrides these three;
    # the chat route's own change nothing.

    def align(self, traj: Trajectory | None) -> None:
        """Under the session lock, before the turn is planned on ``traj``."""

    def client_answer(self, parsed: ParsedAnswer) -> Response:
        """What the client gets for a checked answer (before anything is recorded)."""
        return _client_answer(self, parsed)

    def upstream_refused(self, answer: Answer) -> Response:
        """What the client gets for a non-200 upstream answer."""
        return passthrough(answer)


def _check_request(req: Any) -> None:
    if type(req) is not dict:
        raise errors.invalid_chat_request("the body must be a JSON object")
    messages = req.get("messages")
    if type(messages) is not list or not messages:
        raise errors.invalid_chat_request("messages must be a non-empty list of message objects")
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise errors.invalid_chat_request("every message must be a JSON object")
        for key, types in _MESSAGE_FIELDS:
            if type(message.get(key)) not in types:
                raise errors.invalid_chat_request(f"messages[{i}].{key} has the wrong type")
        for call in message.get("tool_calls") or ():
            if type(call) is not dict:
                raise errors.invalid_chat_request(f"messages[{i}].tool_calls must be objects")
    for key, types in _REQUEST_FIELDS:
        if type(req.get(key)) not in types:
            raise errors.invalid_chat_request(f"{key} has the wrong type")


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
            first_ids = _first_turn_ids(tito, turn)
        session = sessions.auto_create(session_id)
    if settings.trajectory == "tree":  # always-branch: forest_chat
        return await tree_turn(state, session_id, session, turn, n, first_ids, headers, query)

    plan, base, last_assistant = await _planned(session, session_id, turn, settings)
    input_ids = None
    if tito is not None:
        input_ids = _input_ids(tito, turn, plan, base, last_assistant, first_ids)
    inflight = sessions.inflight
    if inflight is None:
        answer = await _ask_upstream(state, turn, input_ids, headers, query, session_id)
    else:
        answer = await _ask_cancellable(
            state, inflight, session, session_id, turn, input_ids, headers, query
        )
    if answer.status != 200:
        state.metrics.chat_turns.inc("upstream_status")
        return turn.upstream_refused(answer)
    checked = _checked(state, turn, answer.body, input_ids)
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
        return first_ids if first_ids is not None else _first_turn_ids(tito, turn)
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
        return _first_turn_ids(tito, turn)
    plan, base, last_assistant = await _planned(session, session_id, turn, state.settings)
    return _input_ids(tito, turn, plan, base, last_assistant, None)


def _first_turn_ids(tito: Tito, turn: ChatRequest) -> array:
    return tito.first_turn(
        turn.messages, turn.req.get("tools"), turn.req.get("chat_template_kwargs")
    )


async def _ask_upstream(
    state: AppState,
    turn: ChatRequest,
    input_ids: array | None,
    headers: list[tuple[str, str]],
    query: str,
    session_id: str,
) -> Answer:
    try:
        return await state.upstream.chat(turn.upstream_body(input_ids), headers, query, session_id)
    except ApiError as exc:
        state.metrics.upstream_errors.inc("timeout" if exc.status == 504 else "transport")
        raise


async def _ask_cancellable(
    state: AppState,
    inflight: InFlight,
    session: Session,
    session_id: str,
    turn: ChatRequest,
    input_ids: array | None,
    headers: list[tuple[str, str]],
    query: str,
) -> Answer:
    """Step 3 with ``CANCEL_ON_DELETE``: a DELETE of the session meanwhile
    cancels the call (its connection is closed, the backend aborts) and the
    turn answers 404; so does a turn whose session closed before its call."""
    if session.closing:  # deleted while step 2 ran: no GPU work for it at all
        raise errors.session_not_found(session_id)
    task = inflight.enter(session)
    try:
        answer = await _ask_upstream(state, turn, input_ids, headers, query, session_id)
    except BaseException:
        if inflight.leave(session, task) or task.uncancel() > 0:
            raise  # not a DELETE's cancel (or also another one, e.g. shutdown)
        state.metrics.chat_turns.inc("cancelled")
        raise errors.session_not_found(session_id) from None
    if inflight.leave(session, task):
        return answer
    # The DELETE's cancel came with the answer and was absorbed on the way:
    # the turn is cancelled all the same, never recorded.
    if task.uncancel() > 0:
        raise asyncio.CancelledError
    state.metrics.chat_turns.inc("cancelled")
    raise errors.session_not_found(session_id)


@dataclass(frozen=True, slots=True)
class CheckedAnswer:
    """An upstream answer, validated, with everything written again from it.

    Bytes and arrays only: never the parsed answer (thousands of objects the
    cyclic GC counts), which would stay alive while the turn awaits its
    journal commit and, many turns at a time, set off young collections.
    """

    prompt_ids: array  # int32
    completion_ids: array  # int32
    logprobs: array  # float32
    answer: bytes  # for the store: the answer without its prompt ids value
    cut: int  # where that value goes back
    assistant: bytes  # the generated message, as the store keeps messages
    client: Response  # what the client gets (routing-replay payloads removed)
    extras: tuple[Any, Any, Any, bool] | None = None  # store.TurnWrite.extras


def _checked(
    state: AppState, turn: ChatRequest, raw: bytes, input_ids: array | None
) -> CheckedAnswer:
    """Step 3's end, before any lock: the answer validated, and with TITO its
    prompt the ``input_ids`` sent; then what the store and the client need,
    so an answer that cannot be written again (nested deeper than orjson
    writes) is a 502 here, never after the turn is recorded."""
    try:
        parsed = parse_answer(raw)
        if input_ids is not None and parsed.prompt_ids != input_ids:
            raise errors.upstream_ignored_input_ids(
                len(input_ids),
                len(parsed.prompt_ids),
                _first_difference(input_ids, parsed.prompt_ids),
            )
        try:
            answer, cut = cut_prompt_ids(raw, parsed.prompt_ids, lambda: parsed.response)
            assistant = orjson.dumps(parsed.message)
            client = turn.client_answer(parsed)
        except orjson.JSONEncodeError as exc:
            raise errors.upstream_malformed(f"the answer cannot be written again ({exc})") from None
    except ApiError:
        state.metrics.upstream_errors.inc("malformed")
        raise
    _, finish, weight_version, cached = parsed.extras
    return CheckedAnswer(
        parsed.prompt_ids,
        parsed.completion_ids,
        parsed.logprobs,
        answer,
        cut,
        assistant,
        client,
        (finish, weight_version, cached, parsed.replay),
    )


def _first_difference(a: array, b: array) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _mismatch(base: array, checked: CheckedAnswer) -> tuple[int, int, int]:
    tokens = checked.prompt_ids + checked.completion_ids
    return len(base), len(tokens), _first_difference(base, tokens)


def is_prefix(base: array, checked: CheckedAnswer) -> bool:
    """Whether ``base`` is a prefix of the answer's prompt ids: a turn's prompt
    covers the whole trajectory before it (a shorter one is refused earlier)."""
    prompt, n = checked.prompt_ids, len(base)
    return len(prompt) >= n and prompt[:n] == base


def _client_answer(turn: ChatRequest, parsed: ParsedAnswer) -> Response:
    """The answer as it came (``raw``: never parsed whole on the fast path),
    unless a routing-replay payload must go or the client asked for a stream."""
    if turn.stream:
        response = _without_replay(parsed.response)
        return Response(200, list(_SSE_HEADERS), whole(SSE_TYPE, sse_body(response)))
    body = orjson.dumps(_without_replay(parsed.response)) if parsed.replay else parsed.raw
    return Response(200, None, whole(JSON_TYPE, body))


def _without_replay(response: dict[str, Any]) -> dict[str, Any]:
    """The answer without routing-replay payloads (``REPLAY_KEYS`` in a choice's
    ``meta_info``): a copy where there are any, ``response`` itself otherwise;
    the record keeps them."""
    choices = response["choices"]
    kept = None
    for i, choice in enumerate(choices):
        meta = choice.get("meta_info") if type(choice) is dict else None
        if type(meta) is dict and any(key in meta for key in REPLAY_KEYS):
            if kept is None:
                kept = list(choices)
            kept[i] = {
                **choice,
                "meta_info": {k: v for k, v in meta.items() if k not in REPLAY_KEYS},
            }
    return response if kept is None else {**response, "choices": kept}


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
