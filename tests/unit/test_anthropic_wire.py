"""The Anthropic Messages translation, both ways (``anthropic_wire``), and the
replay match (``messages.same_assistant``)."""

from __future__ import annotations

from array import array
from typing import Any

import orjson
import pytest

from rollout_sessions.routes.anthropic_wire import (
    error_body,
    sse_events,
    to_chat,
    to_message,
    upstream_message,
)
from rollout_sessions.routes.messages import same_assistant
from rollout_sessions.upstream.answer import ParsedAnswer
from rollout_sessions.web.errors import ApiError

BASE: dict[str, Any] = {"model": "m", "max_tokens": 16}


def chat(**body: Any) -> dict[str, Any]:
    return to_chat({**BASE, **body}).chat


def refused(body: dict[str, Any], text: str) -> None:
    with pytest.raises(ApiError) as caught:
        to_chat({**BASE, **body})
    assert caught.value.status == 400
    assert text in caught.value.message, caught.value.message


def test_user_blocks_become_tool_and_user_messages_in_order() -> None:
    got = chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "a", "content": "ra"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "b",
                        "content": [{"type": "text", "text": "r"}, {"type": "text", "text": "b"}],
                    },
                    {"type": "text", "text": "now"},
                    {"type": "tool_result", "tool_use_id": "c", "is_error": True},
                ],
            }
        ]
    )
    assert got["messages"] == [
        {"role": "tool", "tool_call_id": "a", "content": "ra"},
        {"role": "tool", "tool_call_id": "b", "content": "r\nb"},
        {"role": "user", "content": "now"},
        {"role": "tool", "tool_call_id": "c", "content": ""},
    ]


def test_assistant_blocks_and_system_roles() -> None:
    got = chat(
        system="sys",
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"b": 1, "a": [2]}},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "later"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ],
    )
    assert got["messages"][:3] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "calling",
            "reasoning_content": "hmm",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"b":1,"a":[2]}'},
                }
            ],
        },
    ]
    assert got["messages"][3] == {"role": "system", "content": "later"}


def test_sampling_tools_and_passthrough() -> None:
    got = to_chat(
        {
            **BASE,
            "messages": [{"role": "user", "content": "q"}],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "stop_sequences": ["END"],
            "tools": [{"name": "f", "input_schema": {"type": "object"}, "cache_control": {}}],
            "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
            "thinking": {"type": "adaptive"},
            "chat_template_kwargs": {"x": 1},
            "metadata": {"user_id": "u"},
            "service_tier": "auto",
            "repetition_penalty": 1.1,
            "stream": True,
        }
    )
    assert translated_ok(got.chat) == {
        "model": "m",
        "max_tokens": 16,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["END"],
        "stream": True,
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "chat_template_kwargs": {"x": 1, "enable_thinking": True},
        "repetition_penalty": 1.1,
    }
    assert got.stops == ["END"] and got.model == "m"


def translated_ok(chat_request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chat_request.items() if k != "messages"}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"max_tokens": 0, "messages": [{"role": "user", "content": "q"}]}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "q"}]}, "role must be user or assistant"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0] is a image block",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                    {"role": "user", "content": "r"},
                ]
            },
            "messages[1].content[0] is a redacted_thinking block",
        ),
        ({"system": [{"type": "image"}]}, "system[0] is a image block"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "a bash_20250124 tool"),
        ({"mcp_servers": [{"url": "x"}]}, "mcp_servers cannot be carried"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "structured output"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"thinking": "on"}, "thinking must be an object"),
    ],
)
def test_what_cannot_be_carried_is_400(body: dict[str, Any], text: str) -> None:
    body.setdefault("messages", [{"role": "user", "content": "q"}])
    refused(body, text)


def test_count_tokens_needs_no_max_tokens() -> None:
    got = to_chat({"messages": [{"role": "user", "content": "q"}]}, count_only=True)
    assert "max_tokens" not in got.chat
    refused({"max_tokens": None, "messages": [{"role": "user", "content": "q"}]}, "required")


def parsed(message: dict[str, Any], finish: tuple[Any, Any] = ("stop", None)) -> ParsedAnswer:
    ids = array("i", [1, 2, 3])
    return ParsedAnswer(b"{}", message, ids, array("i", [4, 5]), array("f"), False, finish=finish)


def test_answer_blocks_stop_reasons_and_usage() -> None:
    message = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "why",
        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"x": 1}'}}],
    }
    got = to_message(parsed(message, ("tool_calls", None)), "m", [])
    assert got["content"] == [
        {"type": "thinking", "thinking": "why", "signature": ""},
        {"type": "tool_use", "id": "c", "name": "f", "input": {"x": 1}},
    ]
    assert got["stop_reason"] == "tool_use" and got["model"] == "m"
    assert got["usage"] == {"input_tokens": 3, "output_tokens": 2}
    assert got["id"].startswith("msg_")
    text = {"role": "assistant", "content": "hi"}
    assert to_message(parsed(text, ("length", None)), "m", [])["stop_reason"] == "max_tokens"
    stopped = to_message(parsed(text, ("stop", "END")), "m", ["END"])
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")
    eos = to_message(parsed(text, ("stop", 151645)), "m", ["END"])  # a token id: the EOS
    assert (eos["stop_reason"], eos["stop_sequence"]) == ("end_turn", None)


@pytest.mark.parametrize(
    ("arguments", "text"),
    [("[1]", "is not a JSON object: '[1]'"), ("{", "is not JSON"), (None, "is not a string")],
)
def test_tool_arguments_that_are_not_an_object_are_502(arguments: Any, text: str) -> None:
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}],
    }
    with pytest.raises(ApiError) as caught:
        to_message(parsed(message), "m", [])
    assert caught.value.status == 502
    assert "choices[0].message.tool_calls[0].function.arguments" in caught.value.message
    assert text in caught.value.message


def test_sse_events_carry_the_message() -> None:
    message = to_message(
        parsed(
            {
                "role": "assistant",
                "content": "t",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
            },
            ("tool_calls", None),
        ),
        "m",
        [],
    )
    names = [line[7:] for line in sse_events(message).decode().split("\n") if line[:6] == "event:"]
    assert names == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_stop"] * 2,
        "message_delta",
        "message_stop",
    ]


def test_errors_and_upstream_messages() -> None:
    assert orjson.loads(error_body(404, "gone")) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "gone"},
    }
    assert orjson.loads(error_body(507, "full"))["error"]["type"] == "api_error"
    assert orjson.loads(error_body(413, "big"))["error"]["type"] == "request_too_large"
    assert upstream_message(503, b'{"error": {"message": "busy"}}') == "backend answered 503: busy"
    assert upstream_message(500, b'{"object": "error", "message": "oom"}').endswith(": oom")
    assert upstream_message(502, b"plain") == "backend answered 502: plain"


def test_a_replayed_assistant_matches_the_stored_one_by_parsed_arguments() -> None:
    stored = {
        "role": "assistant",
        "content": "x",
        "reasoning_content": None,
        "tool_calls": [
            {
                "id": "c",
                "index": 0,
                "type": "function",
                "function": {"name": "f", "arguments": '{"a": 1, "b": [1, 2]}'},
            }
        ],
    }
    sent = {
        "role": "assistant",
        "content": "x",
        "tool_calls": [
            {
                "id": "c",
                "type": "function",
                "function": {"name": "f", "arguments": '{"b":[1,2],"a":1}'},
            }
        ],
    }
    assert same_assistant(stored, sent)
    for change in ({"content": "y"}, {"reasoning_content": "r"}):
        assert not same_assistant(stored, {**sent, **change})
    other = orjson.loads(orjson.dumps(sent))
    other["tool_calls"][0]["function"]["arguments"] = '{"a":2,"b":[1,2]}'
    assert not same_assistant(stored, other)
    other["tool_calls"][0]["function"]["arguments"] = '{"a":1,"b":[1,2]}'
    other["tool_calls"][0]["id"] = "d"
    assert not same_assistant(stored, other)
