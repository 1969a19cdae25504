"""Where TITO's prompts and a whole render of the conversation part ways.

With token-in, token-out a prompt keeps what the model generated and saw; a
template that is not append-only (Qwen3's stock one drops earlier ``<think>``
blocks, others rewrite earlier turns when a later message arrives) would
render the same conversation differently. That is not an error, but the
operator should know, and where:

- at start-up, ``log_append_only_report`` builds a short conversation (tools,
  reasoning, tool calls, a user follow-up) turn by turn exactly as the chat
  route does, and compares it with the whole render: an INFO line when they
  agree, else a WARNING naming the first differing message and what follows
  for the prompts. The server serves either way;
- ``GET /sessions/{id}?tito_check=1`` (``mismatches``): the positions where a
  session's stored ids differ from a fresh whole render of its messages, with
  the decoded text around each difference.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from difflib import SequenceMatcher
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
import orjson

from rollout_sessions.web.endpoints import query_string
from rollout_sessions.web.errors import ApiError

if TYPE_CHECKING:
    from blacksheep import Request

    from rollout_sessions.tito import Tito
    from rollout_sessions.trajectory.store import Trajectory

log = logging.getLogger("rollout_sessions")

REPORT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def _call(call_id: str, city: str, days: int) -> dict[str, Any]:
    arguments = orjson.dumps({"city": city, "days": days}).decode()
    function = {"name": "get_weather", "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}


# system, user, assistant (reasoning + tool call), tool, assistant (reasoning +
# answer), user, assistant (reasoning + two tool calls), tool, tool, assistant.
REPORT_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the weather tool.",
        "tool_calls": [_call("call_1", "Paris", 1)],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
    {
        "role": "assistant",
        "content": "It is 21 degrees and clear in Paris.",
        "reasoning_content": "The tool says 21 degrees.",
    },
    {"role": "user", "content": "And in Rome and Oslo tomorrow?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Two cities: two calls.",
        "tool_calls": [_call("call_2", "Rome", 2), _call("call_3", "Oslo", 2)],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 25, "sky": "sun"}'},
    {"role": "tool", "tool_call_id": "call_3", "content": '{"temp_c": 9, "sky": "rain"}'},
    {
        "role": "assistant",
        "content": "Rome: 25 degrees and sunny. Oslo: 9 degrees and rain.",
        "reasoning_content": "Both results are in.",
    },
]


def turn_by_turn(tito: Tito, conversation: list[dict[str, Any]], tools: list[Any] | None) -> array:
    """The ids TITO keeps for ``conversation`` (which ends with an assistant
    message), built turn by turn as the chat route builds them, each assistant
    message generated as a model of the family generates it; the boundary rule
    applied to the end, as a next turn would continue it."""
    checkpoint: array | None = None
    previous = -1
    for a, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        if checkpoint is None:
            prompt = tito.first_turn(conversation[:a], tools)
        else:
            last = conversation[previous]
            appended = conversation[previous + 1 : a]
            prompt = tito.next_turn(checkpoint, last, appended, tools, None, previous + 1)
        completion = tito.encode(tito.completion_text(conversation[:a], message, tools))
        checkpoint = prompt + completion
        previous = a
    assert checkpoint is not None, "the conversation has no assistant message"
    return tito.apply_boundary(checkpoint)


def append_only_report(tito: Tito) -> tuple[bool, str]:
    """(append-only?, what to log) for the template of ``tito``."""
    conversation, tools = REPORT_CONVERSATION, REPORT_TOOLS
    size = f"a {len(conversation)}-message conversation with tool calls and reasoning"
    try:
        built = turn_by_turn(tito, conversation, tools)
    except ApiError as exc:
        return False, (
            f"TITO: the chat template does not render {size} turn by turn: {exc.message}. "
            "Turns that append such messages are refused (400); supply a template that "
            "renders appended messages after earlier ones with CHAT_TEMPLATE"
        )
    kwargs = tito.template_kwargs
    whole_text = tito.render(conversation, tools, False, kwargs)
    whole = tito.encode(whole_text)
    if built == whole:
        return True, (
            f"TITO: the chat template renders append-only ({size}: TITO's turn-by-turn "
            "prompts equal its whole render)"
        )
    built_text = tito.tokenizer.decode(built.tolist())
    at = _first_difference(built_text, whole_text)
    if at is None:
        position = _first_difference(built, whole)
        return False, (
            f"TITO: the chat template renders {size} as the same text turn by turn and "
            f"whole, but tokenized differently from token {position} on: a re-tokenized "
            "conversation would differ from TITO's prompts there"
        )
    index = _message_at(tito, conversation, tools, at)
    role = conversation[index]["role"]
    return False, (
        f"TITO: the chat template is not append-only: for {size}, its whole render first "
        f"differs from TITO's turn-by-turn prompts at message {index} ({role}): whole "
        f"render {_excerpt(whole_text, at)!r}, TITO {_excerpt(built_text, at)!r}. TITO's "
        "prompts keep what the model generated and saw, so every turn extends the "
        f"trajectory; a whole re-render of the conversation (TITO off, or a trainer that "
        f"re-tokenizes messages) differs from message {index} on. For a template that "
        "agrees, set CHAT_TEMPLATE (or the template's kwargs in CHAT_TEMPLATE_KWARGS)"
    )


def log_append_only_report(tito: Tito) -> None:
    """Log ``append_only_report`` (a check that fails is logged, never raised)."""
    try:
        ok, message = append_only_report(tito)
    except Exception as exc:  # a template can fail in many ways; start-up goes on
        log.warning("TITO: could not check whether the chat template is append-only: %s", exc)
        return
    (log.info if ok else log.warning)("%s", message)


def _first_difference(a: Any, b: Any) -> int | None:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


def _message_at(
    tito: Tito, conversation: list[dict[str, Any]], tools: list[Any] | None, at: int
) -> int:
    """The message whose text holds character ``at`` of the whole render."""
    for i in range(len(conversation)):
        if len(tito.render(conversation[: i + 1], tools, False, tito.template_kwargs)) > at:
            return i
    return len(conversation) - 1


def _excerpt(text: str, at: int, before: int = 30, after: int = 50) -> str:
    return text[max(0, at - before) : at + after]


# -- GET /sessions/{id}?tito_check=1 ---------------------------------------------------

_YES = ("1", "true", "on", "yes")
_NO = ("0", "false", "off", "no", "")


def requested(tito: Tito | None, request: Request) -> bool:
    """Whether the GET asks for ``tito_check``; 400 for a bad value or with TITO off."""
    query = query_string(request)
    if "tito_check" not in query:
        return False
    values = parse_qs(query, keep_blank_values=True).get("tito_check")
    if not values:
        return False
    value = values[-1].strip().lower()
    if value not in _YES + _NO:
        raise ApiError(400, f"tito_check must be 1 or 0, got {values[-1]!r}")
    if value in _NO:
        return False
    if tito is None:
        raise ApiError(400, "tito_check needs token-in, token-out (set TOKENIZER)")
    return True


async def metadata_entry(tito: Tito, traj: Trajectory | None) -> dict[str, Any]:
    """``{"tito_mismatch": [...]}`` for a session's metadata, computed off the
    event loop (a render, an encode and a diff of the whole trajectory)."""
    return {"tito_mismatch": await asyncio.to_thread(mismatches, tito, traj)}


MAX_REGIONS = 20
CONTEXT_TOKENS = 8
MAX_IDS = 32
# Above this many differing tokens on a side the middle is one region (a
# token-level diff of it would cost seconds).
_DIFF_LIMIT = 20000


def mismatches(tito: Tito, traj: Trajectory | None) -> list[dict[str, Any]]:
    """Where the stored ids of a session differ from a fresh whole render of its
    messages (the last turn's request and the assistant answer), as the next
    turn would continue them (the boundary rule applied)."""
    if traj is None or traj.num_turns == 0:
        return []
    k = traj.num_turns - 1
    messages = [orjson.loads(m) for m in traj.request_messages(k)]
    messages.append(traj.message(traj.message_end(k) - 1))
    rest = orjson.loads(b"{" + traj.turns[k].rest + b"}")
    tools = rest.get("tools") if isinstance(rest.get("tools"), list) else None
    request_kwargs = rest.get("chat_template_kwargs")
    kwargs = tito._kwargs(request_kwargs if isinstance(request_kwargs, dict) else None)
    stored = tito.apply_boundary(traj.checkpoint(traj.num_turns))
    try:
        fresh = tito.encode(tito.render(messages, tools, False, kwargs))
    except ApiError as exc:
        return [{"position": 0, "error": exc.message}]
    return diff(tito, stored, fresh)


def diff(tito: Tito, stored: array, fresh: array) -> list[dict[str, Any]]:
    """The differing regions of two id sequences, each with its decoded context."""
    a = np.frombuffer(stored, dtype=np.int32)
    b = np.frombuffer(fresh, dtype=np.int32)
    n = min(len(a), len(b))
    unequal = np.flatnonzero(a[:n] != b[:n])
    if not len(unequal) and len(a) == len(b):
        return []
    start = int(unequal[0]) if len(unequal) else n
    tail = 0
    while tail < min(len(a), len(b)) - start and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    a_mid, b_mid = a[start : len(a) - tail].tolist(), b[start : len(b) - tail].tolist()
    if len(a_mid) <= _DIFF_LIMIT and len(b_mid) <= _DIFF_LIMIT:
        matcher = SequenceMatcher(None, a_mid, b_mid, autojunk=False)
        regions = [
            (i1 + start, i2 + start, j1 + start, j2 + start)
            for op, i1, i2, j1, j2 in matcher.get_opcodes()
            if op != "equal"
        ]
    else:
        regions = [(start, len(a) - tail, start, len(b) - tail)]
    decode = tito.tokenizer.decode
    out = []
    for i1, i2, j1, j2 in regions[:MAX_REGIONS]:
        stored_ids, fresh_ids = a[i1:i2].tolist(), b[j1:j2].tolist()
        out.append(
            {
                "position": i1,
                "rendered_position": j1,
                "stored_ids": stored_ids[:MAX_IDS],
                "rendered_ids": fresh_ids[:MAX_IDS],
                "stored_count": len(stored_ids),
                "rendered_count": len(fresh_ids),
                # Same text, other ids: the model's own (non-canonical) tokenization.
                "same_text": decode(stored_ids) == decode(fresh_ids),
                "stored_text": decode(a[_around(i1, i2)].tolist()),
                "rendered_text": decode(b[_around(j1, j2)].tolist()),
            }
        )
    if len(regions) > MAX_REGIONS:
        out.append({"position": regions[MAX_REGIONS][0], "more": len(regions) - MAX_REGIONS})
    return out


def _around(start: int, end: int) -> slice:
    return slice(max(0, start - CONTEXT_TOKENS), end + CONTEXT_TOKENS)
