"""``POST /sessions/{id}/v1/messages``: an Anthropic Messages turn, as a chat turn.

The request is translated to a chat request (``anthropic_wire.to_chat``) and
driven through the chat turn itself (``chat.run_turn``): lookup,
auto-create, the trajectory rules, token-in token-out, the journal and the
record are the chat route's, and the record keeps the chat request as
forwarded and the upstream's chat answer. Only three things differ
(``MessagesTurn``, the chat request's hooks):

- under the session lock, before the turn is planned, an assistant message
  the client replays is matched to the stored one it stands for: when role,
  text, reasoning and tool calls agree, with each ``tool_use`` ``input``
  equal to the stored ``arguments`` parsed as JSON, the stored message is
  forwarded as it is, so the trajectory extends (an Anthropic client never
  sees the upstream's arguments text, only the object parsed from it);
- the client's answer is the Anthropic message (or its event stream) made
  from the checked chat answer, before anything is recorded: a tool call
  whose arguments are not a JSON object is a 502 and nothing is recorded;
- errors, the upstream's non-200 answers included, have Anthropic's shape.

No credential goes upstream from this route: ``authorization``,
``x-api-key`` and ``anthropic-*`` headers are dropped (``UPSTREAM_API_KEY``
still applies).

``POST /sessions/{id}/v1/messages/count_tokens``: with token-in, token-out
on, the number of prompt ids the turn would send, planned as the turn
would plan it; nothing changes. Without TITO the backend tokenizes, so the
server cannot count: 501.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Request, Response

from rollout_sessions.routes import chat
from rollout_sessions.routes.anthropic_wire import (
    error_body,
    sse_events,
    to_chat,
    to_message,
    upstream_message,
)
from rollout_sessions.routes.forward import TurnRoute
from rollout_sessions.routes.relay import client_headers
from rollout_sessions.routes.turn import ChatRequest
from rollout_sessions.trajectory.rules import _norm
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.upstream.answer import ParsedAnswer
from rollout_sessions.upstream.client import Answer
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import JSON_TYPE, json_response, parse_json, read_body, whole
from rollout_sessions.web.errors import ApiError
from rollout_sessions.web.routing import COUNT_TOKENS_SUBPATH, MESSAGES_SUBPATH

if TYPE_CHECKING:
    from rollout_sessions.upstream.controls import Overrides
    from rollout_sessions.web.state import AppState

log = logging.getLogger("rollout_sessions")

SSE_TYPE = b"text/event-stream"
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# Request headers that stay here: the client's credentials and Anthropic's own.
_NOT_UPSTREAM = ("authorization", "x-api-key")


class MessagesTurn(ChatRequest):
    """An Anthropic Messages request, translated: a chat request with its own
    alignment, answer and errors (see the module docstring)."""

    __slots__ = ("model", "stops")

    def __init__(
        self,
        body: bytes,
        arrived: float,
        overrides: Overrides | None = None,
        count_only: bool = False,
    ) -> None:
        translated = to_chat(parse_json(body), count_only)
        super().__init__(translated.chat, arrived, overrides)
        self.model = translated.model
        self.stops = translated.stops

    def align(self, traj: Trajectory | None) -> None:
        if traj is None:
            return
        stored = traj.messages
        sent = self.message_bytes
        messages = self.messages
        for i in range(min(len(stored), len(messages))):
            if sent[i] == stored[i] or messages[i].get("role") != "assistant":
                continue
            old = orjson.loads(stored[i])
            if same_assistant(old, messages[i]):
                messages[i] = old
                sent[i] = stored[i]

    def client_answer(self, parsed: ParsedAnswer) -> Response:
        message = to_message(parsed, self.model, self.stops)
        if self.stream:
            return Response(200, list(SSE_HEADERS), whole(SSE_TYPE, sse_events(message)))
        return Response(200, None, whole(JSON_TYPE, orjson.dumps(message)))

    def upstream_refused(self, answer: Answer) -> Response:
        status = answer.status
        # A redirect or other non-error status is no chat answer: its headers
        # (a Location into the backend) are not passed on.
        return anthropic_error(ApiError(status, upstream_message(status, answer.body)))


def same_assistant(stored: dict[str, Any], sent: dict[str, Any]) -> bool:
    """Whether a translated assistant message stands for a stored one: role,
    content and reasoning as the chat rule compares them, tool calls with the
    same ids and names and ``arguments`` equal as parsed JSON."""
    if stored.get("role") != "assistant":
        return False
    for key in ("content", "reasoning_content"):
        if _norm(stored.get(key)) != _norm(sent.get(key)):
            return False
    mine = stored.get("tool_calls") or []
    theirs = sent.get("tool_calls") or []
    if type(mine) is not list or len(mine) != len(theirs):
        return False
    for a, b in zip(mine, theirs, strict=True):
        fa = a.get("function") if type(a) is dict else None
        if type(fa) is not dict or a.get("id") != b["id"]:
            return False
        fb = b["function"]
        if fa.get("name") != fb["name"] or type(fa.get("arguments")) is not str:
            return False
        try:
            if orjson.loads(fa["arguments"]) != orjson.loads(fb["arguments"]):
                return False
        except orjson.JSONDecodeError:
            return False
    return True


def anthropic_error(err: ApiError) -> Response:
    headers = [(b"connection", b"close")] if err.status in (408, 413) else None
    return Response(err.status, headers, whole(JSON_TYPE, error_body(err.status, err.message)))


def upstream_headers(request: Request) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in client_headers(request)
        if name.lower() not in _NOT_UPSTREAM and not name.lower().startswith("anthropic-")
    ]


def _post_only(request: Request, subpath: str) -> None:
    if request.method != "POST":
        raise errors.method_not_allowed(request.method, "/sessions/{id}/" + subpath, "POST")


async def messages_turn(state: AppState, session_id: str, request: Request) -> Response:
    """One Anthropic Messages turn; raises ``ApiError`` for every error answer."""
    _post_only(request, MESSAGES_SUBPATH)
    arrived = time.time()
    try:
        session = state.sessions.live_for_turn(session_id)
        settings = state.settings
        body = await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
        turn = MessagesTurn(body, arrived, state.overrides)
        return await chat.run_turn(state, session_id, session, turn, upstream_headers(request), "")
    except ApiError:
        raise
    except Exception:  # a bug must still answer in this route's shape
        log.exception("Anthropic Messages turn failed")
        raise errors.internal_error() from None


async def count_tokens(state: AppState, session_id: str, request: Request) -> Response:
    """``{"input_tokens": n}``: the prompt ids the turn would send (TITO on)."""
    _post_only(request, COUNT_TOKENS_SUBPATH)
    if state.tito is None:
        raise ApiError(
            501,
            "count_tokens needs token-in, token-out (TOKENIZER set): without it the "
            "backend tokenizes, and the server cannot count the prompt",
        )
    session = state.sessions.live_for_turn(session_id)
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
    turn = MessagesTurn(body, time.time(), state.overrides, count_only=True)
    ids = await chat.prompt_ids(state, session_id, session, turn)
    return json_response({"input_tokens": len(ids)})


_ERRORS = {
    400: "invalid id, an Anthropic request the server cannot carry, or a trajectory "
    "that does not extend the session",
    401: "API_KEY set and neither `Authorization: Bearer` nor `x-api-key` carries it",
    404: "deleted or closing",
    413: "body too large",
}


def turn_routes() -> dict[str, TurnRoute]:
    """The two routes, for ``forwarding.add_routes``."""
    return {
        MESSAGES_SUBPATH: TurnRoute(
            handler=messages_turn,
            render_error=anthropic_error,
            summary="Anthropic Messages turn through a session",
            description="Translated to a chat-completions turn, forwarded and recorded as "
            "one; answered as an Anthropic message (SSE events when `stream: true`). "
            "Errors have Anthropic's shape.",
            tags=["anthropic"],
            responses={
                200: "the Anthropic message (JSON, or SSE when `stream: true`)",
                **_ERRORS,
                502: "backend transport error or malformed backend answer",
                504: "backend timeout",
            },
        ),
        COUNT_TOKENS_SUBPATH: TurnRoute(
            handler=count_tokens,
            render_error=anthropic_error,
            summary="Anthropic count_tokens for a session's next turn",
            description="The prompt ids the turn would send (token-in, token-out); "
            "nothing changes.",
            tags=["anthropic"],
            responses={
                200: '`{"input_tokens": n}`',
                **_ERRORS,
                501: "token-in, token-out is off (no TOKENIZER)",
            },
        ),
    }
