"""``POST /sessions/{id}/v1/chat/completions``: one chat turn through a session.

The split lock (see DESIGN.md, "Chat turn (split lock)"):

1. look the session up, auto-creating a never-seen id (404 if deleted or
   closing); read and parse the body and force the SGLang flags the
   trajectory needs;
2. under ``session.lock``, briefly: check the messages against the stored
   trajectory (``trajectory.plan_turn``) and remember what it looked like;
3. without any lock: the upstream call. Non-200 answers pass through
   unrecorded, transport failures are 502, timeouts 504, malformed answers
   502 naming what is wrong;
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
from blacksheep import Content, Response
from orjson import Fragment

from rollout_sessions import errors
from rollout_sessions.errors import ApiError
from rollout_sessions.httputil import id_checked, parse_json, read_body
from rollout_sessions.proxy import chat_headers, passthrough_response
from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.session import Session
from rollout_sessions.trajectory import check_prefix, commit_turn, plan_turn, unchanged_since

if TYPE_CHECKING:
    from rollout_sessions.state import AppState

CHAT_PATH = "/v1/chat/completions"
JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream"
_INT_ONLY = {int}
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def chat_completions(state: AppState, session_id: str, request: Any) -> Response:
    """One chat turn; raises ``ApiError`` for every error answer."""
    registry = state.registry
    session = id_checked(registry.lookup, session_id)
    if session is DELETED or (session is not NEVER_SEEN and session.closing):
        raise errors.session_not_found(session_id)

    # The body is checked before a never-seen id is auto-created: a bad request
    # changes no state.
    settings = state.settings
    req = parse_json(await read_body(request, settings.max_body_bytes))
    if type(req) is not dict:
        raise errors.invalid_chat_request("the body must be a JSON object")
    messages = req.get("messages")
    if type(messages) is not list or not messages:
        raise errors.invalid_chat_request("messages must be a non-empty list of message objects")
    for message in messages:
        if type(message) is not dict:
            raise errors.invalid_chat_request("every message must be a JSON object")
    if session is NEVER_SEEN:
        # Restart tolerance: an id this server never saw is created on first chat.
        session = registry.get_or_create(session_id, Session)
        if session is DELETED or session.closing:  # deleted while the body was read
            raise errors.session_not_found(session_id)
    # The backend never streams: the trajectory needs the complete answer.
    stream = bool(req.pop("stream", False))
    stream_options = req.pop("stream_options", None)
    # Forced, not defaulted: the client cannot switch off what the trajectory needs.
    req["logprobs"] = True
    req["return_prompt_token_ids"] = True
    req["return_meta_info"] = True
    req["no_stop_trim"] = False

    metrics = state.metrics
    lock = session.lock
    async with lock:
        if session.closing:
            raise errors.session_not_found(session_id)
        keep = plan_turn(session, messages, settings.allowed_append_roles)
        checkpoints = session.checkpoints
        expected_n = len(checkpoints) if checkpoints else 0
        expected_last = checkpoints[-1] if checkpoints else None

    upstream_body = orjson.dumps(req)
    try:
        status, raw_headers, raw = await state.upstream.chat(
            upstream_body, chat_headers(request), request.url.query
        )
    except ApiError as exc:
        metrics.upstream_errors.inc("timeout" if exc.status == 504 else "transport")
        raise
    if status != 200:
        metrics.chat_turns.inc("upstream_status")
        return passthrough_response(status, raw_headers, raw)
    try:
        response, assistant, tokens = parse_answer(raw)
    except ApiError:
        metrics.upstream_errors.inc("malformed")
        raise

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
            # copy of the parsed trees stays alive, a fraction of the memory, and
            # nothing for the garbage collector to walk (GET splices them in).
            record = {
                "timestamp": time.time(),
                "method": request.method,
                "path": CHAT_PATH,
                "status_code": status,
                "request": Fragment(upstream_body),
                "response": Fragment(raw),
            }
            commit_turn(session, keep, messages, assistant, tokens, record)
            outcome = "recorded"
    metrics.chat_turns.inc(outcome)

    if stream:
        include_usage = type(stream_options) is dict and bool(stream_options.get("include_usage"))
        return Response(
            200, list(_SSE_HEADERS), Content(SSE_TYPE, sse_body(response, include_usage))
        )
    return Response(200, None, Content(JSON_TYPE, raw))


def parse_answer(raw: bytes) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """Validate an upstream answer: ``(answer, assistant message, checkpoint ids)``.

    The checkpoint is ``choices[0].prompt_token_ids`` followed by the token ids
    of ``choices[0].meta_info.output_token_logprobs``. ``ApiError`` 502 names
    what is wrong otherwise.
    """
    try:
        response = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.upstream_malformed(f"the answer is not JSON ({exc})") from None
    if type(response) is not dict:
        raise errors.upstream_malformed("the answer is not a JSON object")
    choices = response.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        raise errors.upstream_malformed("choices[0] is missing")
    choice = choices[0]
    meta = choice.get("meta_info")
    if type(meta) is not dict:
        raise errors.upstream_malformed(
            "choices[0].meta_info is missing (the backend must honour return_meta_info=true)"
        )
    logprobs = meta.get("output_token_logprobs")
    if type(logprobs) is not list:
        raise errors.upstream_malformed(
            "choices[0].meta_info.output_token_logprobs is missing "
            "(the backend must honour logprobs=true)"
        )
    message = choice.get("message")
    if type(message) is not dict:
        raise errors.upstream_malformed("choices[0].message is missing")
    if message.get("content") is None:
        raise errors.upstream_malformed(
            "choices[0].message.content is None (a backend whose tool-call parser fails "
            "must still answer an empty string)"
        )
    completion_tokens = meta.get("completion_tokens")
    if type(completion_tokens) is not int:
        raise errors.upstream_malformed(
            f"choices[0].meta_info.completion_tokens is not an integer: {completion_tokens!r}"
        )
    if completion_tokens != len(logprobs):
        raise errors.upstream_malformed(
            f"meta_info.completion_tokens={completion_tokens} != "
            f"len(output_token_logprobs)={len(logprobs)}"
        )
    try:
        completion = [entry[1] for entry in logprobs]
    except (TypeError, IndexError, KeyError):
        completion = None
    # set(map(type, ...)) runs in C: no per-token Python bytecode.
    if completion is None or (completion and set(map(type, completion)) != _INT_ONLY):
        raise errors.upstream_malformed(
            "meta_info.output_token_logprobs entries must be [logprob, token_id, ...] "
            "with an integer token_id"
        )
    prompt = choice.get("prompt_token_ids")
    if type(prompt) is not list:
        raise errors.upstream_malformed(
            "choices[0].prompt_token_ids is missing "
            "(the backend must honour return_prompt_token_ids=true)"
        )
    # A new list: the answer's own prompt_token_ids stays as received in the record.
    return response, message, prompt + completion


def sse_body(response: dict[str, Any], include_usage: bool = False) -> bytes:
    """The complete answer as ``chat.completion.chunk`` events and ``data: [DONE]``.

    One chunk carries the whole message (role, content, reasoning, every tool
    call with its ``index``), the next one the finish reason, then usage when
    the client asked for it (``stream_options.include_usage``), as OpenAI does.
    """
    choice = response["choices"][0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {
        "role": message.get("role") or "assistant",
        "content": message.get("content"),
    }
    if message.get("reasoning_content") is not None:
        delta["reasoning_content"] = message["reasoning_content"]
    tool_calls = message.get("tool_calls")
    if tool_calls:
        delta["tool_calls"] = [
            {**call, "index": i} if type(call) is dict else call
            for i, call in enumerate(tool_calls)
        ]
    created = response.get("created")
    head = {
        "id": response.get("id") or "chatcmpl-session",
        "object": "chat.completion.chunk",
        "created": created if type(created) is int else int(time.time()),
        "model": response.get("model") or "",
    }
    events = [
        {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": choice.get("finish_reason") or "stop",
                }
            ],
        },
    ]
    usage = response.get("usage")
    if include_usage and usage is not None:
        events.append({**head, "choices": [], "usage": usage})
    out = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)
