"""What every turn kind shares (the linear chat turn, tree mode, Anthropic Messages):
the checked chat request (``ChatRequest``), the upstream call (cancellable
on delete), the answer validated and written again (``checked_answer``),
and what the client gets (JSON or a short SSE stream, routing-replay
payloads removed).
"""

from __future__ import annotations

import asyncio
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Response

from rollout_sessions.routes.relay import passthrough
from rollout_sessions.trajectory.store import Trajectory, cut_prompt_ids, ids_json
from rollout_sessions.upstream.answer import REPLAY_KEYS, ParsedAnswer, parse_answer, sse_body
from rollout_sessions.upstream.client import Answer
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import (
    JSON_TYPE,
    parse_json,
    whole,
)
from rollout_sessions.web.errors import ApiError

if TYPE_CHECKING:
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.tito import Tito
    from rollout_sessions.upstream.controls import InFlight, Overrides
    from rollout_sessions.web.state import AppState


SSE_TYPE = b"text/event-stream"
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

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
        return client_answer(self, parsed)

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


def first_turn_ids(tito: Tito, turn: ChatRequest) -> array:
    return tito.first_turn(
        turn.messages, turn.req.get("tools"), turn.req.get("chat_template_kwargs")
    )


async def ask(
    state: AppState,
    session: Session,
    session_id: str,
    turn: ChatRequest,
    input_ids: array | None,
    headers: list[tuple[str, str]],
    query: str,
) -> Answer:
    """Step 3: the upstream call, cancellable by a DELETE with ``CANCEL_ON_DELETE``."""
    inflight = state.sessions.inflight
    if inflight is None:
        return await ask_upstream(state, turn, input_ids, headers, query, session_id)
    return await ask_cancellable(
        state, inflight, session, session_id, turn, input_ids, headers, query
    )


async def ask_upstream(
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


async def ask_cancellable(
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
        answer = await ask_upstream(state, turn, input_ids, headers, query, session_id)
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


def checked_answer(
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
                first_difference(input_ids, parsed.prompt_ids),
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


def first_difference(a: array, b: array) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def is_prefix(base: array, checked: CheckedAnswer) -> bool:
    """Whether ``base`` is a prefix of the answer's prompt ids: a turn's prompt
    covers the whole trajectory before it (a shorter one is refused earlier)."""
    prompt, n = checked.prompt_ids, len(base)
    return len(prompt) >= n and prompt[:n] == base


def client_answer(turn: ChatRequest, parsed: ParsedAnswer) -> Response:
    """The answer as it came (``raw``: never parsed whole on the fast path),
    unless a routing-replay payload must go or the client asked for a stream."""
    if turn.stream:
        response = without_replay(parsed.response)
        return Response(200, list(SSE_HEADERS), whole(SSE_TYPE, sse_body(response)))
    body = orjson.dumps(without_replay(parsed.response)) if parsed.replay else parsed.raw
    return Response(200, None, whole(JSON_TYPE, body))


def without_replay(response: dict[str, Any]) -> dict[str, Any]:
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
