"""Upstream chat answers: validated completely (502 naming the defect), and their SSE form."""

from __future__ import annotations

from array import array
from typing import Any

import orjson
import pytest

from rollout_sessions.answer import parse_answer, sse_body
from rollout_sessions.errors import ApiError

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
