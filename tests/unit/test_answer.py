"""Upstream chat answers: validated completely (502 naming the defect), and their SSE form."""

from __future__ import annotations

import json
from array import array
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_sessions.upstream import answer as answer_module
from rollout_sessions.upstream.answer import parse_answer, sse_body
from rollout_sessions.web.errors import ApiError

META = {"output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]], "completion_tokens": 2}


def answer(**over: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "stop",
        "prompt_token_ids": [1, 2],
        "meta_info": dict(META),
    }
    choice.update(over)
    return {"id": "x", "created": 1, "model": "m", "choices": [choice]}


def test_parse_answer_splits_prompt_completion_and_logprobs():
    parsed = parse_answer(orjson.dumps(answer()))
    assert parsed.prompt_ids == array("i", [1, 2])
    assert parsed.completion_ids == array("i", [5, 6])
    assert parsed.logprobs == array("f", [-0.1, -0.2])
    assert parsed.message == {"role": "assistant", "content": "hi"}
    assert parsed.response["choices"][0]["prompt_token_ids"] == [1, 2]


def test_tool_calls_and_reasoning_are_accepted():
    message = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "think",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
    }
    assert parse_answer(orjson.dumps(answer(message=message))).message == message


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"choices": []}', "choices[0]"),
        (answer(meta_info=None), "meta_info and output_token_logprobs must be in choices[0]"),
        (answer(meta_info={"completion_tokens": 0}), "output_token_logprobs must be in"),
        (answer(message=None), "assistant message content is None"),
        (answer(message={"role": "assistant", "content": None}), "content is None"),
        (answer(message={"role": "assistant", "content": 5}), "content is not a string"),
        (
            answer(message={"role": "assistant", "content": "", "tool_calls": 5}),
            "tool_calls is not a list",
        ),
        (
            answer(message={"role": "assistant", "content": "", "tool_calls": [1]}),
            "tool_calls[0] is not an object",
        ),
        (
            answer(message={"role": "assistant", "content": "", "reasoning_content": 1}),
            "reasoning_content is not a string",
        ),
        (answer(message={"role": 5, "content": "hi"}), "message.role is not a string"),
        (
            answer(meta_info={**META, "completion_tokens": 3}),
            "len(output_token_logprobs)=2 != completion_tokens=3",
        ),
        (answer(meta_info={**META, "completion_tokens": "2"}), "not an integer"),
        (
            answer(meta_info={"output_token_logprobs": [[-0.1, "a"]], "completion_tokens": 1}),
            "non-integer token id: 'a'",
        ),
        (
            answer(meta_info={"output_token_logprobs": [[-0.1, True]], "completion_tokens": 1}),
            "non-integer token id: True",
        ),
        (
            answer(meta_info={"output_token_logprobs": [[-0.1]], "completion_tokens": 1}),
            "[logprob, token_id, ...]",
        ),
        (
            answer(meta_info={"output_token_logprobs": ["ab"], "completion_tokens": 1}),
            "[logprob, token_id, ...]",
        ),
        (
            answer(meta_info={"output_token_logprobs": [["x", 5]], "completion_tokens": 1}),
            "numeric logprob",
        ),
        (
            answer(meta_info={"output_token_logprobs": [[-0.1, 2**31]], "completion_tokens": 1}),
            "token id out of range: 2147483648",
        ),
        (answer(prompt_token_ids=None), "prompt_token_ids is missing"),
        (answer(prompt_token_ids=[1, "x"]), "prompt_token_ids holds a non-integer token id: 'x'"),
        (answer(prompt_token_ids=[1, -1]), "token id out of range: -1"),
        (answer(prompt_token_ids=[1, -(2**40)]), "token id out of range: -1099511627776"),
        (answer(prompt_token_ids=[1, None]), "non-integer token id: None"),
        (answer(prompt_token_ids=[1, 2.0]), "non-integer token id: 2.0"),
        (answer(prompt_token_ids=[1, True]), "prompt_token_ids holds a non-integer token id: True"),
        (
            answer(prompt_token_ids=[False, 7]),
            "prompt_token_ids holds a non-integer token id: False",
        ),
    ],
)
def test_malformed_answers_are_502_naming_the_defect(raw: Any, needle: str):
    data = raw if isinstance(raw, bytes) else orjson.dumps(raw)
    with pytest.raises(ApiError) as err:
        parse_answer(data)
    assert err.value.status == 502
    assert err.value.message.startswith("malformed backend answer: ")
    assert needle in err.value.message


def test_sse_is_one_chunk_then_done():
    full = answer(
        message={
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "type": "function"}, {"id": "d", "type": "function"}],
        },
        finish_reason="tool_calls",
    )
    full["usage"] = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    events = [e for e in sse_body(full).decode().split("\n\n") if e]
    assert len(events) == 2 and events[1] == "data: [DONE]"
    chunk = orjson.loads(events[0].removeprefix("data: "))
    assert chunk["object"] == "chat.completion.chunk"
    (choice,) = chunk["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["index"] for c in choice["delta"]["tool_calls"]] == [0, 1]
    assert choice["delta"]["role"] == "assistant"
    assert chunk["usage"]["total_tokens"] == 4
    assert "meta_info" not in chunk


def test_a_boolean_elsewhere_in_the_answer_does_not_refuse_integer_prompt_ids():
    message = {"role": "assistant", "content": "true or false"}
    parsed = parse_answer(orjson.dumps(answer(message=message, logprobs=False)))
    assert parsed.prompt_ids == array("i", [1, 2])


def test_booleans_in_prompt_ids_are_found_however_the_json_is_written():
    spaced = orjson.dumps(answer()).replace(
        b'"prompt_token_ids":[1,2]', b'"prompt_token_ids": [1, true]'
    )
    duplicate = orjson.dumps(answer()).replace(
        b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,2],"prompt_token_ids":[true,5]'
    )
    for raw in (spaced, duplicate):
        with pytest.raises(ApiError) as err:
            parse_answer(raw)
        assert err.value.status == 502
        assert "prompt_token_ids holds a non-integer token id: True" in err.value.message


def test_a_prompt_key_quoted_inside_a_string_is_not_the_prompt():
    message = {"role": "assistant", "content": '"prompt_token_ids":[true]'}
    parsed = parse_answer(orjson.dumps(answer(message=message)))
    assert parsed.prompt_ids == array("i", [1, 2])


# -- the fast path (simdjson) against the full parse (orjson) ---------------------------


def outcome(parse: Any, raw: bytes) -> Any:
    """What a parse gives: the parts the trajectory and the client use, or the error."""
    try:
        parsed = parse(raw)
    except ApiError as exc:
        return ("error", exc.status, exc.message)
    if parsed is None:
        return None
    return (
        parsed.message,
        parsed.prompt_ids.tolist(),
        parsed.completion_ids.tolist(),
        parsed.logprobs.tolist(),
        parsed.replay,
        parsed.response,
    )


def test_a_realistic_answer_takes_the_fast_path():
    content = [{"token": "w", "logprob": -0.25, "bytes": [119], "top_logprobs": []}] * 800
    raw = orjson.dumps(answer(logprobs={"content": content}, prompt_token_ids=list(range(9000))))
    fast = outcome(answer_module._parse_fast, raw)
    assert fast is not None
    assert fast == outcome(answer_module._parse_full, raw)
    assert fast[1] == list(range(9000))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # duplicate keys where the fast path looks up: orjson keeps the last
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,2],"prompt_token_ids":[3,4]'),
        (b'"completion_tokens":2', b'"completion_tokens":1,"completion_tokens":2'),
        (b'"choices":[', b'"choices":[],"choices":['),
        (b'"message":{', b'"message":{"content":"first",'),
        # values the fast path leaves to the full parse
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,123456789012345678901234567890]'),
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,2.0]'),
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,true]'),
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[1,2147483648]'),
        (b'"prompt_token_ids":[1,2]', b'"prompt_token_ids":[]'),
        (b'"completion_tokens":2', b'"completion_tokens":true'),
        (b'"completion_tokens":2', b'"completion_tokens":{"n":2}'),
        (b'"model":"m"', b'"model":"\\ud800"'),
        (b'"model":"m"', b'"model":"\\ud83d\\ude00"'),
        (b'"model":"m"', b'"model":1e400'),
        (b'"model":"m"', b'"model":' + b"[" * 300 + b"]" * 300),
        (b'"model":"m"', b'"model":' + b"[" * 1100 + b"]" * 1100),
        (b'"meta_info":{', b'"meta_info":{"routed_experts":[1],'),
        (b'"meta_info":{', b'"meta_info":{"indexer_topk":1,"indexer_topk":2,'),
        (b'"choices":[{', b'"choices":[{"meta_info":{"indexer_topk":[]}},{'),
        (b"}]}", b'},{"meta_info":{},"meta_info":{"indexer_topk":1}}]}'),
        (b"}]}", b'},{"meta_info":{"indexer_topk":1},"meta_info":{}}]}'),
        (b'"choices":[{', b'"choices":[7,{'),
        (b'"message":{', b'"message":[{'),
        (b'{"id"', b'[{"id"'),
        (b'{"id"', b'\xef\xbb\xbf{"id"'),
        (b'"id":"x"', b'"id":"x"}{'),
    ],
)
def test_the_fast_path_agrees_with_the_full_parse(old: bytes, new: bytes):
    raw = orjson.dumps(answer())
    assert old in raw
    raw = raw.replace(old, new, 1)
    if new.startswith(b"[{"):  # the array closed
        raw += b"]"
    fast = outcome(answer_module._parse_fast, raw)
    full = outcome(answer_module._parse_full, raw)
    if fast is not None:
        assert fast == full
    assert outcome(parse_answer, raw) == full


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.lists(
        st.one_of(
            st.integers(-5, 2**31 + 5),
            st.integers(0, 2**70),
            st.booleans(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.none(),
        ),
        max_size=6,
    ),
    entries=st.lists(
        st.one_of(
            st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 2**31 - 1)),
            st.tuples(st.booleans(), st.integers(-3, 3)),
            st.just([]),
            st.just({"x": 1}),
        ),
        max_size=4,
    ),
    count=st.one_of(st.integers(0, 5), st.booleans(), st.floats(0, 5), st.none()),
    content=st.one_of(st.text(max_size=8), st.none(), st.integers()),
    extra_meta=st.sampled_from([{}, {"routed_experts": [1, 2]}, {"indexer_topk": None}]),
)
def test_fast_and_full_parse_agree_on_any_answer(prompt, entries, count, content, extra_meta):
    meta = {"output_token_logprobs": [list(e) for e in entries], "completion_tokens": count}
    body = answer(
        prompt_token_ids=prompt,
        message={"role": "assistant", "content": content},
        meta_info={**extra_meta, **meta},
    )
    raw = json.dumps(body, separators=(",", ":")).encode()  # integers past 64 bits too
    fast = outcome(answer_module._parse_fast, raw)
    full = outcome(answer_module._parse_full, raw)
    if fast is not None:
        assert fast == full
    assert outcome(parse_answer, raw) == full
