"""``POST /sessions/{id}/v1/chat/completions``: one chat turn through a session.

The split lock:

1. look the session up, auto-creating a never-seen id (404 if deleted or
   closing); read and parse the body and force the SGLang flags the
   trajectory needs (a bad body is 400 and creates nothing);
2. under ``session.lock``, briefly: check the messages against the stored
   trajectory (``trajectory.plan_turn``) and remember what it looked like;
3. without any lock: the upstream call. Non-200 answers pass through
   unrecorded, transport failures are 502, timeouts 504, malformed answers
   502 naming the defect (``answer.parse_answer``);
4. under the lock again, briefly: if the session is closing or another turn
   was recorded meanwhile, answer without recording; else check the stored
   checkpoint is a prefix of the new token ids (500 if not) and record.

No ``await`` happens while the lock is held, so a DELETE never waits for an
upstream call. ``stream: true`` is served from the complete upstream answer
(the backend is always called without streaming: the trajectory needs the
whole answer and its token ids) as a short, valid SSE stream.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Content, Request, Response
from orjson import Fragment

from rollout_sessions import errors
from rollout_sessions.answer import parse_answer, sse_body
from rollout_sessions.errors import ApiError
from rollout_sessions.forwarding import client_headers, passthrough
from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.routing import CHAT_PATH
from rollout_sessions.session import Session
from rollout_sessions.trajectory import check_prefix, commit_turn, plan_turn, unchanged_since
from rollout_sessions.web import JSON_TYPE, id_checked, parse_json, query_string, read_body

if TYPE_CHECKING:
    from rollout_sessions.state import AppState

SSE_TYPE = b"text/event-stream"
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
)


def _parse_request(body: bytes) -> dict[str, Any]:
    req = parse_json(body)
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
    return req


def _upstream_body(req: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(req)
    except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than orjson writes
        raise errors.invalid_chat_request(f"the body cannot be forwarded: {exc}") from None


async def chat_completions(state: AppState, session_id: str, request: Request) -> Response:
    """One chat turn; raises ``ApiError`` for every error answer."""
    registry = state.registry
    session = id_checked(registry.lookup, session_id)
    if session is DELETED or (session is not NEVER_SEEN and session.closing):
        raise errors.session_not_found(session_id)

    # The whole body is checked before a never-seen id is auto-created: a bad
    # request changes no state.
    settings = state.settings
    req = _parse_request(
        await read_body(request, settings.max_body_bytes, settings.header_timeout_s)
    )
    messages = req["messages"]
    stream = bool(req.pop("stream", False))
    req.pop("stream_options", None)
    req.update(FORCED_FLAGS)
    upstream_body = _upstream_body(req)
    if session is NEVER_SEEN:
        # Restart tolerance: an id this server never saw is created on first chat.
        session = registry.get_or_create(session_id, Session)
        if session is DELETED or session.closing:  # deleted while the body was read
            raise errors.session_not_found(session_id)

    metrics = state.metrics
    lock = session.lock
    async with lock:
        if session.closing:
            raise errors.session_not_found(session_id)
        keep = plan_turn(session, messages, settings.allowed_append_roles)
        checkpoints = session.checkpoints
        expected_n = len(checkpoints) if checkpoints else 0
        expected_last = checkpoints[-1] if checkpoints else None

    try:
        answer = await state.upstream.chat(
            upstream_body, client_headers(request), query_string(request)
        )
    except ApiError as exc:
        metrics.upstream_errors.inc("timeout" if exc.status == 504 else "transport")
        raise
    if answer.status != 200:
        metrics.chat_turns.inc("upstream_status")
        return passthrough(answer)
    try:
        parsed = parse_answer(answer.body)
    except ApiError:
        metrics.upstream_errors.inc("malformed")
        raise
    tokens = parsed.prompt_ids + parsed.completion_ids

    async with lock:
        if session.closing:
            outcome = "closing"
        elif not unchanged_since(session, expected_n, expected_last):
            outcome = "stale"  # a concurrent turn of this session won
        else:
            try:
                check_prefix(session, keep, tokens)
            except ApiError:
                metrics.chat_turns.inc("checkpoint_mismatch")
                raise
            # Request and answer are kept as the JSON bytes already at hand: no
            # copy of the parsed trees stays alive (GET splices them in).
            record = {
                "timestamp": time.time(),
                "method": "POST",
                "path": CHAT_PATH,
                "status_code": 200,
                "request": Fragment(upstream_body),
                "response": Fragment(answer.body),
            }
            commit_turn(session, keep, messages, parsed.message, tokens, record)
            outcome = "recorded"
    metrics.chat_turns.inc(outcome)

    if stream:
        body = sse_body(parsed.response)
        return Response(200, list(_SSE_HEADERS), Content(SSE_TYPE, body))
    return Response(200, None, Content(JSON_TYPE, answer.body))
