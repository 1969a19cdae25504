"""The upstream's chat answer: validated completely before anything is recorded.

``parse_answer`` checks every part the trajectory depends on and names the
first defect (an ``ApiError`` 502): ``choices[0].message`` with a string
``content``, ``role`` and ``reasoning_content`` absent or strings, ``tool_calls``
absent or a list of objects, ``choices[0].prompt_token_ids`` a list of token ids,
``choices[0].meta_info.output_token_logprobs`` a list of
``[logprob, token_id, ...]`` with ``completion_tokens`` equal to its length.
A token id is an integer in ``[0, 2**31)``; a logprob is a number. Token
ids come back as int32 arrays and logprobs as float32: what the trajectory
keeps.

``sse_body`` renders a complete answer as the short SSE stream a client that
asked for ``stream: true`` gets.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from rollout_sessions import errors

MAX_TOKEN_ID = 2**31 - 1
TOKEN_TYPECODE = "i"  # token ids are stored as int32
LOGPROB_TYPECODE = "f"  # logprobs as float32
PROMPT_KEY = b'"prompt_token_ids":'  # as compact JSON writes the key
_NO_LOGPROBS = (
    "meta_info and output_token_logprobs must be in choices[0] "
    "(the backend must honour return_meta_info=true and logprobs=true)"
)
_NUMBER_TYPES = frozenset({int, float})


@dataclass(slots=True)
class ParsedAnswer:
    response: dict[str, Any]
    message: dict[str, Any]
    prompt_ids: array  # int32
    completion_ids: array  # int32
    logprobs: array  # float32, one per completion id


def token_array(values: list[Any], where: str) -> array:
    """``values`` as int32 token ids; ``ApiError`` 502 naming the first bad one.

    The conversion runs in C and is the check: a non-integer fails it, and so
    does an id of 2**31 or more; a negative id is caught by the minimum.
    """
    try:
        ids = array(TOKEN_TYPECODE, values)
    except (TypeError, OverflowError):
        ids = None
    if ids is not None and not (ids and np.frombuffer(ids, np.int32).min() < 0):
        return ids
    for v in values:
        if type(v) is not int:
            raise errors.upstream_malformed(f"{where} holds a non-integer token id: {v!r}")
        if not 0 <= v <= MAX_TOKEN_ID:
            raise errors.upstream_malformed(f"{where} holds a token id out of range: {v}")
    raise AssertionError("unreachable: array() refused a valid list")


def _message(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    content = message.get("content") if type(message) is dict else None
    if content is None:
        raise errors.upstream_malformed(
            "assistant message content is None (a backend whose tool-call parser fails "
            "must still answer an empty string)"
        )
    if type(content) is not str:
        raise errors.upstream_malformed(
            f"choices[0].message.content is not a string: {type(content).__name__}"
        )
    role = message.get("role")
    if role is not None and type(role) is not str:  # the client sends it back as a request role
        raise errors.upstream_malformed("choices[0].message.role is not a string")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and type(reasoning) is not str:
        raise errors.upstream_malformed("choices[0].message.reasoning_content is not a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if type(tool_calls) is not list:
            raise errors.upstream_malformed(
                f"choices[0].message.tool_calls is not a list: {type(tool_calls).__name__}"
            )
        for i, call in enumerate(tool_calls):
            if type(call) is not dict:
                raise errors.upstream_malformed(
                    f"choices[0].message.tool_calls[{i}] is not an object"
                )
    return message


def _completion(meta: dict[str, Any]) -> tuple[array, array]:
    entries = meta.get("output_token_logprobs")
    if type(entries) is not list:
        raise errors.upstream_malformed(_NO_LOGPROBS)
    count = meta.get("completion_tokens")
    if type(count) is not int:
        raise errors.upstream_malformed(
            f"choices[0].meta_info.completion_tokens is not an integer: {count!r}"
        )
    if count != len(entries):
        raise errors.upstream_malformed(
            f"len(output_token_logprobs)={len(entries)} != completion_tokens={count}"
        )
    shape = "meta_info.output_token_logprobs entries must be [logprob, token_id, ...]"
    try:
        ids = [entry[1] for entry in entries]
        logprobs = [entry[0] for entry in entries]
    except (TypeError, IndexError, KeyError):
        raise errors.upstream_malformed(shape) from None
    if entries and not set(map(type, entries)) <= {list, tuple}:
        raise errors.upstream_malformed(shape)
    if logprobs and not set(map(type, logprobs)) <= _NUMBER_TYPES:
        raise errors.upstream_malformed(f"{shape} with a numeric logprob")
    where = "meta_info.output_token_logprobs"
    _refuse_booleans(ids, where)
    return token_array(ids, where), array(LOGPROB_TYPECODE, logprobs)


def _refuse_booleans(ids: list[Any], where: str) -> None:
    """JSON true/false are not token ids, though int32 conversion reads them as 1/0."""
    if ids and set(map(type, ids)) != {int}:
        bad = next(v for v in ids if type(v) is not int)
        raise errors.upstream_malformed(f"{where} holds a non-integer token id: {bad!r}")


def parse_answer(raw: bytes) -> ParsedAnswer:
    """Validate an upstream chat answer (see the module docstring)."""
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
    message = _message(choice)
    meta = choice.get("meta_info")
    if type(meta) is not dict:
        raise errors.upstream_malformed(_NO_LOGPROBS)
    completion, logprobs = _completion(meta)
    prompt = choice.get("prompt_token_ids")
    if type(prompt) is not list:
        raise errors.upstream_malformed(
            "choices[0].prompt_token_ids is missing "
            "(the backend must honour return_prompt_token_ids=true)"
        )
    where = "choices[0].prompt_token_ids"
    prompt_ids = token_array(prompt, where)
    if _may_hold_booleans(raw):
        _refuse_booleans(prompt, where)
    return ParsedAnswer(response, message, prompt_ids, completion, logprobs)


def _may_hold_booleans(raw: bytes) -> bool:
    """False only if every ``"prompt_token_ids":`` key in ``raw`` is followed by a
    list without ``t`` or ``f`` (no ``true``/``false``), as compact JSON writes it.

    A prompt is long: a type scan of it costs ~0.15 ms, these byte scans a few
    µs. In valid JSON a key's opening quote never follows a backslash, and a
    quote inside a string always does, so every real key is looked at
    (duplicates too: the parser keeps the last one).
    """
    found = False
    at = raw.find(PROMPT_KEY)
    while at >= 0:
        if raw[at - 1] != 0x5C:  # 0x5C: backslash
            found = True
            start = at + len(PROMPT_KEY)
            end = raw.find(b"]", start)
            if end < 0 or raw.find(b"t", start, end) >= 0 or raw.find(b"f", start, end) >= 0:
                return True
        at = raw.find(PROMPT_KEY, at + 1)
    return not found


def sse_body(response: dict[str, Any]) -> bytes:
    """The complete answer as one ``chat.completion.chunk`` event and ``data: [DONE]``.

    The chunk carries the whole message as its delta (role, content,
    reasoning, every tool call with its ``index``), the finish reason, and the
    answer's ``usage`` when it has one: what an OpenAI client accumulates from
    a stream, in a single event.
    """
    choice = response["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {
        "role": message.get("role") or "assistant",
        "content": message.get("content"),
    }
    if message.get("reasoning_content") is not None:
        delta["reasoning_content"] = message["reasoning_content"]
    tool_calls = message.get("tool_calls")
    if tool_calls:
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(tool_calls)]
    created = response.get("created")
    chunk: dict[str, Any] = {
        "id": response.get("id") or "chatcmpl-session",
        "object": "chat.completion.chunk",
        "created": created if type(created) is int else int(time.time()),
        "model": response.get("model") or "",
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": choice.get("finish_reason") or "stop",
            }
        ],
    }
    usage = response.get("usage")
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
