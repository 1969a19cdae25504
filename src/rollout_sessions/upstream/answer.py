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

Two readers, one verdict: simdjson validates the whole document and only
the parts read become Python objects (``_parse_fast``); anything unusual
(a document simdjson refuses, a duplicate key where it looks one up, a value
of another type) goes to ``orjson.loads`` of the whole answer
(``_parse_full``), which names the defect. The fast path never accepts what
the full parse refuses, and gives the same values where it accepts. In it,
``output_token_logprobs`` in its usual shape (``[logprob, id, null]``
entries) goes from simdjson's minified text to the two arrays in C
(``_logprobs.read_pairs``); any other shape is read as Python lists.

``sse_body`` renders a complete answer as the short SSE stream a client that
asked for ``stream: true`` gets.
"""

from __future__ import annotations

import time
from array import array
from typing import Any

import numpy as np
import orjson
import simdjson

from rollout_sessions._logprobs import narrow_ids, read_pairs
from rollout_sessions.trajectory.store import LOGPROB_TYPECODE, TOKEN_TYPECODE, prompt_id_values
from rollout_sessions.web import errors

MAX_TOKEN_ID = 2**31 - 1
_NO_LOGPROBS = (
    "meta_info and output_token_logprobs must be in choices[0] "
    "(the backend must honour return_meta_info=true and logprobs=true)"
)
_NUMBER_TYPES = frozenset({int, float})
_UTF8_BOM = b"\xef\xbb\xbf"
_SimdObject = simdjson.Object
_SimdArray = simdjson.Array

# Routing-replay payloads in a choice's ``meta_info``: recorded, never
# answered to the client.
REPLAY_KEYS = ("routed_experts", "indexer_topk")


class ParsedAnswer:
    """A validated answer: what the trajectory keeps, and the answer itself.

    ``response`` (the whole answer as Python objects) is parsed on first use:
    the fast path reads only the parts the trajectory needs, and the client
    gets ``raw`` as it came unless a routing-replay payload (``replay``) or a
    stream needs the answer written again.
    """

    __slots__ = (
        "raw",
        "message",
        "prompt_ids",
        "completion_ids",
        "logprobs",
        "replay",
        "finish",
        "extras",
        "_response",
    )

    def __init__(
        self,
        raw: bytes,
        message: dict[str, Any],
        prompt_ids: array,  # int32
        completion_ids: array,  # int32
        logprobs: array,  # float32, one per completion id
        replay: bool,  # a choice's meta_info holds a REPLAY_KEYS payload
        response: dict[str, Any] | None = None,
        finish: tuple[Any, Any] = (None, None),
        extras: tuple[Any, Any, Any, Any] = (None, None, None, None),
    ) -> None:
        self.raw = raw
        self.message = message
        self.prompt_ids = prompt_ids
        self.completion_ids = completion_ids
        self.logprobs = logprobs
        self.replay = replay
        # choices[0]'s finish_reason and the stop it matched (SGLang's
        # matched_stop, vLLM's stop_reason), as sent: read, never validated.
        self.finish = finish
        # (id, choices[0].finish_reason, meta_info.weight_version,
        # meta_info.cached_tokens): what a trajectory node keeps of the answer
        self.extras = extras
        self._response = response

    @property
    def response(self) -> dict[str, Any]:
        if self._response is None:
            try:
                self._response = orjson.loads(self.raw)
            except orjson.JSONDecodeError as exc:  # simdjson took it: not expected
                raise errors.upstream_malformed(f"the answer is not JSON ({exc})") from None
        return self._response


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


def _message(message: Any) -> dict[str, Any]:
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


def _completion(entries: Any, count: Any) -> tuple[array, array]:
    if type(entries) is not list:
        raise errors.upstream_malformed(_NO_LOGPROBS)
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
    fast = _parse_fast(raw)
    return fast if fast is not None else _parse_full(raw)


def _parse_fast(raw: bytes) -> ParsedAnswer | None:
    """The answer read with simdjson, without building its Python objects.

    Materialising a realistic answer with ``orjson.loads`` (800 logprob entries
    in ``logprobs.content`` and again in ``meta_info``, a prompt of thousands
    of ids) and freeing it was most of the cost of reading it; simdjson
    validates the whole document and only the parts read here become objects
    (figures in benchmarks/RESULTS.md and CHANGELOG.md). ``None``
    for anything unusual, and ``_parse_full`` decides (and names the defect):
    a document simdjson refuses (orjson reads some of those: integers past
    64 bits), a duplicate key where this path looks a key up (simdjson finds
    the first, orjson keeps the last), a value of an unexpected type.
    """
    if raw.startswith(_UTF8_BOM):  # simdjson skips it; orjson (and clients) refuse it
        return None
    try:
        doc = simdjson.Parser().parse(raw)
    except (ValueError, RuntimeError):  # not JSON, too deep, a big integer...
        return None
    if not _is_plain_object(doc):
        return None
    choices = doc.get("choices")
    if type(choices) is not _SimdArray or not len(choices):
        return None
    replay = _replay_in(choices)  # also: every choice and its meta_info plain
    choice = choices[0]
    if replay is None or type(choice) is not _SimdObject:
        return None
    meta = choice.get("meta_info")
    prompt = choice.get("prompt_token_ids")
    if type(meta) is not _SimdObject or type(prompt) is not _SimdArray:
        return None
    entries = meta.get("output_token_logprobs")
    if type(entries) is not _SimdArray:
        return None
    try:
        buffer = prompt.as_buffer(of_type="i")  # int64; a bool, float or string refuses
    except (TypeError, ValueError):
        return None
    prompt_ids = narrow_ids(buffer, MAX_TOKEN_ID)
    if prompt_ids is None:
        return None
    count = meta.get("completion_tokens")
    if type(count) is not int:
        return None
    message = choice.get("message")
    if type(message) is _SimdObject:
        message = message.as_dict()  # duplicates: the last, as orjson
    message = _message(message)  # the defects in _parse_full's order
    pairs = read_pairs(entries.mini, count, MAX_TOKEN_ID) if count == len(entries) else None
    completion, logprobs = pairs or _completion(entries.as_list(), count)
    extras = (
        _scalar(doc.get("id")),
        _finish_reason(_scalar(choice.get("finish_reason")), meta.get("finish_reason")),
        _scalar(meta.get("weight_version")),
        _scalar(meta.get("cached_tokens")),
    )
    return ParsedAnswer(
        raw, message, prompt_ids, completion, logprobs, replay, None, _finish(choice), extras
    )


def _scalar(value: Any) -> Any:
    """A JSON scalar as is; an object or array (not expected here) as Python objects."""
    if type(value) is _SimdObject:
        return value.as_dict()
    if type(value) is _SimdArray:
        return value.as_list()
    return value


def _finish_reason(value: Any, meta_reason: Any) -> Any:
    """``choices[0].finish_reason``, else SGLang's ``meta_info.finish_reason.type``."""
    if value is None and meta_reason is not None:
        if type(meta_reason) is _SimdObject or type(meta_reason) is dict:
            return _scalar(meta_reason.get("type"))
    return value


def _finish(choice: Any) -> tuple[Any, Any]:
    """Scalars only (a simdjson object or array would outlive its document)."""
    reason = choice.get("finish_reason")
    matched = choice.get("matched_stop")
    if matched is None:
        matched = choice.get("stop_reason")
    return (
        reason if type(reason) is str else None,
        matched if type(matched) in (str, int) else None,
    )


def _replay_in(choices: Any) -> bool | None:
    """Whether a choice's ``meta_info`` holds a replay payload (the answer is then
    written again without it); ``None`` if a choice or its ``meta_info`` repeats
    a key (orjson would read the last one, simdjson finds the first)."""
    replay = False
    for choice in choices:
        if type(choice) is not _SimdObject:
            continue
        if not _is_plain_object(choice):
            return None
        meta = choice.get("meta_info")
        if type(meta) is _SimdObject:
            if not _is_plain_object(meta):
                return None
            replay = replay or any(key in REPLAY_KEYS for key in meta.keys())
    return replay


def _is_plain_object(value: Any) -> bool:
    """A simdjson object without duplicate keys."""
    if type(value) is not _SimdObject:
        return False
    keys = list(value.keys())
    return len(set(keys)) == len(keys)


def _parse_full(raw: bytes) -> ParsedAnswer:
    """The answer parsed whole with orjson, every defect named."""
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
    message = _message(choice.get("message"))
    meta = choice.get("meta_info")
    if type(meta) is not dict:
        raise errors.upstream_malformed(_NO_LOGPROBS)
    completion, logprobs = _completion(
        meta.get("output_token_logprobs"), meta.get("completion_tokens")
    )
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
    replay = any(
        type(other) is dict
        and type(other.get("meta_info")) is dict
        and any(key in other["meta_info"] for key in REPLAY_KEYS)
        for other in choices
    )
    extras = (
        response.get("id"),
        _finish_reason(choice.get("finish_reason"), meta.get("finish_reason")),
        meta.get("weight_version"),
        meta.get("cached_tokens"),
    )
    return ParsedAnswer(
        raw, message, prompt_ids, completion, logprobs, replay, response, _finish(choice), extras
    )


def _may_hold_booleans(raw: bytes) -> bool:
    """False only if every ``"prompt_token_ids":`` key in ``raw`` is followed by a
    list without ``t`` or ``f`` (no ``true``/``false``), as compact JSON writes it.

    A prompt is long: a type scan of its ids costs far more than these byte
    scans. In valid JSON a key's opening quote never follows a backslash, and a
    quote inside a string always does, so every real key is looked at
    (duplicates too: the parser keeps the last one).
    """
    found = False
    for start in prompt_id_values(raw):
        found = True
        end = raw.find(b"]", start)
        if end < 0 or raw.find(b"t", start, end) >= 0 or raw.find(b"f", start, end) >= 0:
            return True
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
