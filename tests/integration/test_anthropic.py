"""Anthropic Messages through a session: the official ``anthropic`` SDK against
``serve`` and a chat-completions backend (the echo backend, or the fake one
that records what it was sent), over real sockets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
import requests
from conftest import ServerProc, serve
from fake_upstream import FakeUpstream

from rollout_sessions.testing.processes import ManagedProcess, start_echo
from rollout_sessions.testing.tokenizers import build_tokenizer

TOOLS = [
    {
        "name": "lookup",
        "description": "look something up",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
    {"name": "other", "input_schema": {"type": "object"}},
]
SYSTEM = "You help."


def sdk(srv: ServerProc, sid: str, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(
        base_url=f"{srv.url}/sessions/{sid}", max_retries=0, timeout=30, **kw
    )


def session(srv: ServerProc, sid: str) -> dict[str, Any]:
    resp = srv.get(f"/sessions/{sid}")
    assert resp.status_code == 200
    return resp.json()


def ask(client: anthropic.Anthropic, messages: list, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 256)
    return client.messages.create(model="m", system=SYSTEM, messages=messages, **kw)


def sid() -> str:
    return "anth-" + uuid.uuid4().hex[:12]


def post(srv: ServerProc, path: str, body: Any, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return srv.post(path, data=data, headers=headers, **kw)


def assert_error(resp: requests.Response, status: int, kind: str, text: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == kind
    assert text in body["error"]["message"], body


# -- text, tools, thinking -------------------------------------------------------------


def test_text_turn_is_recorded_as_a_chat_turn(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        # This SDK no longer takes sampling parameters as arguments; the API still does.
        sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 7}
        message = ask(client, [{"role": "user", "content": "hello"}], extra_body=sampling)
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.model == "m" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "echo: hello"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    (record,) = session(srv, s)["records"]
    assert record["path"] == "/v1/chat/completions"
    request = record["request"]
    assert request["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hello"},
    ]
    assert request["max_tokens"] == 256 and request["temperature"] == 0.5
    assert request["top_k"] == 7 and request["top_p"] == 0.9 and request["logprobs"] is True
    choice = record["response"]["choices"][0]
    assert message.usage.input_tokens == len(choice["prompt_token_ids"])
    assert message.usage.output_tokens == len(choice["meta_info"]["output_token_logprobs"])


def test_system_blocks_and_text_blocks(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        client.messages.create(
            model="m",
            max_tokens=32,
            system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            metadata={"user_id": "u1"},
        )
    request = session(srv, s)["records"][0]["request"]
    assert request["messages"] == [
        {"role": "system", "content": "one\ntwo"},
        {"role": "user", "content": "a\nb"},
    ]
    assert "metadata" not in request


def test_multi_turn_tools_extend_one_trajectory(srv: ServerProc) -> None:
    s = sid()
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    with sdk(srv, s) as client:
        first = ask(client, messages, tools=TOOLS)
        assert first.stop_reason == "tool_use"
        (call,) = first.content
        assert call.type == "tool_use" and call.name == "lookup"
        assert call.input == {"query": "weather in Paris?", "round": 0}
        # The SDK's own blocks sent back, then the tool's result.
        messages += [
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ]
        second = ask(client, messages, tools=TOOLS)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "echo: sunny"
    got = session(srv, s)
    assert got["metadata"]["num_assistant"] == 2
    first_rec, second_rec = got["records"]
    stored = first_rec["response"]["choices"][0]["message"]
    sent = second_rec["request"]["messages"]
    # The upstream's own arguments text ("round": 0, with a space) went back,
    # not the JSON the SDK's input would be written as.
    assert sent[2] == stored and '"round": 0' in stored["tool_calls"][0]["function"]["arguments"]
    assert sent[3] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    # The checkpoint of turn 1 is a prefix of turn 2's prompt: one trajectory.
    ids1 = first_rec["response"]["choices"][0]["prompt_token_ids"]
    ids2 = second_rec["response"]["choices"][0]["prompt_token_ids"]
    assert ids2[: len(ids1)] == ids1
    assert first_rec["request"]["tools"][0] == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": TOOLS[0]["input_schema"],
        },
    }


def test_an_edited_tool_input_is_a_different_turn(srv: ServerProc) -> None:
    s = sid()
    messages: list[Any] = [{"role": "user", "content": "find it"}]
    with sdk(srv, s) as client:
        first = ask(client, messages, tools=TOOLS)
        call = first.content[0]
        edited = {"type": "tool_use", "id": call.id, "name": call.name, "input": {"query": "x"}}
        messages += [
            {"role": "assistant", "content": [edited]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id}]},
        ]
        ask(client, messages, tools=TOOLS)
    got = session(srv, s)
    # Not the stored tool call: a retry one step back, the first turn replaced.
    assert got["metadata"]["num_assistant"] == 1
    assert len(got["records"][0]["request"]["messages"]) == 4


def test_thinking_enabled_and_replayed(srv: ServerProc) -> None:
    s = sid()
    messages: list[Any] = [{"role": "user", "content": "think first"}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with sdk(srv, s) as client:
        first = ask(client, messages, tools=TOOLS, thinking=thinking)
        assert [b.type for b in first.content] == ["thinking", "tool_use"]
        assert first.content[0].thinking == "thinking about: think first"
        messages += [
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": first.content[1].id, "content": "42"}
                ],
            },
        ]
        second = ask(client, messages, tools=TOOLS, thinking=thinking)
        assert [b.type for b in second.content] == ["thinking", "text"]
    got = session(srv, s)
    assert got["metadata"]["num_assistant"] == 2
    first_rec, second_rec = got["records"]
    assert first_rec["request"]["chat_template_kwargs"] == {"enable_thinking": True}
    replayed = second_rec["request"]["messages"][2]
    assert replayed["reasoning_content"] == "thinking about: think first"

    # Without its thinking block the assistant message is another one: this
    # history leaves the trajectory two turns back, which is refused.
    messages[1] = {"role": "assistant", "content": [first.content[1]]}
    with sdk(srv, s) as client:
        with pytest.raises(anthropic.BadRequestError, match="rollback failed"):
            ask(client, messages, tools=TOOLS, thinking=thinking)
    assert session(srv, s)["metadata"]["num_assistant"] == 2


def test_thinking_disabled_turns_it_off(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        message = ask(client, [{"role": "user", "content": "hi"}], thinking={"type": "disabled"})
    assert [b.type for b in message.content] == ["text"]
    request = session(srv, s)["records"][0]["request"]
    assert request["chat_template_kwargs"] == {"enable_thinking": False}


# -- tool_choice and stops -------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "forwarded", "called"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "none"}, "none", None),
        ({"type": "any"}, "required", "lookup"),
        ({"type": "tool", "name": "other"}, {"type": "function", "function": {"name": "other"}},
         "other"),
    ],
)  # fmt: skip
def test_tool_choice(srv: ServerProc, choice: dict, forwarded: Any, called: str | None) -> None:
    s = sid()
    # After one tool round the echo answers in text (as it decides under auto),
    # unless the choice forces a call.
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c0", "name": "lookup", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c0", "content": "x"}]},
    ]
    with sdk(srv, s) as client:
        message = ask(client, messages, tools=TOOLS, tool_choice=choice)
    request = session(srv, s)["records"][0]["request"]
    assert request["tool_choice"] == forwarded
    if called is None:
        assert message.stop_reason == "end_turn"
        assert all(b.type != "tool_use" for b in message.content)
    else:
        assert message.stop_reason == "tool_use"
        assert [b.name for b in message.content if b.type == "tool_use"] == [called]


def test_disable_parallel_tool_use(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        ask(
            client,
            [{"role": "user", "content": "go"}],
            tools=TOOLS,
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
    assert session(srv, s)["records"][0]["request"]["parallel_tool_calls"] is False


def test_stop_sequence_and_max_tokens(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        stopped = ask(client, [{"role": "user", "content": "hello"}], stop_sequences=["zz", "lo"])
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "lo"
        assert stopped.content[0].text == "echo: hel"
    assert session(srv, s)["records"][0]["request"]["stop"] == ["zz", "lo"]
    with sdk(srv, sid()) as client:
        plain = ask(client, [{"role": "user", "content": "hello"}], stop_sequences=["zz"])
        assert plain.stop_reason == "end_turn" and plain.stop_sequence is None
    s = sid()
    with sdk(srv, s) as client:
        cut = ask(
            client,
            [{"role": "user", "content": "a long enough question"}],
            max_tokens=5,
            extra_body={"echo": {"truncate": True}},
        )
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 5
    record = session(srv, s)["records"][0]
    assert record["response"]["choices"][0]["finish_reason"] == "length"


# -- streaming ---------------------------------------------------------------------------


def test_stream_assembled_by_the_sdk(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        with client.messages.stream(
            model="m",
            max_tokens=64,
            system=SYSTEM,
            messages=[{"role": "user", "content": "stream me"}],
            tools=TOOLS,
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == "thinking about: stream me"
    assert final.content[1].input == {"query": "stream me", "round": 0}
    assert final.stop_reason == "tool_use"
    record = session(srv, s)["records"][0]
    choice = record["response"]["choices"][0]
    assert final.usage.input_tokens == len(choice["prompt_token_ids"])
    assert final.usage.output_tokens == len(choice["meta_info"]["output_token_logprobs"])
    assert record["request"].get("stream") is None  # the backend is never asked to stream
    with sdk(srv, sid()) as client:
        with client.messages.stream(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "text please"}]
        ) as stream:
            assert "".join(stream.text_stream) == "echo: text please"


def events(resp: requests.Response) -> list[tuple[str, dict]]:
    out = []
    for chunk in resp.text.split("\n\n"):
        if not chunk.strip():
            continue
        name_line, data_line = chunk.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = orjson.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        out.append((name_line[7:], data))
    return out


def test_raw_event_order(srv: ServerProc) -> None:
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "order"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": TOOLS,
        "echo": {"tool_rounds": 1},
    }
    resp = post(srv, f"/sessions/{sid()}/v1/messages", body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    got = events(resp)
    names = [name for name, _ in got]
    assert names == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_stop"] * 2,
        "message_delta",
        "message_stop",
    ]
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    assert got[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert got[2][1]["delta"] == {"type": "thinking_delta", "thinking": "thinking about: order"}
    assert got[4][1]["content_block"]["type"] == "tool_use"
    assert got[4][1]["content_block"]["input"] == {}
    delta = got[5][1]["delta"]
    assert delta["type"] == "input_json_delta"
    assert orjson.loads(delta["partial_json"]) == {"query": "order", "round": 0}
    assert [d["index"] for _, d in got[1:7]] == [0, 0, 0, 1, 1, 1]
    assert got[7][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert got[7][1]["usage"]["output_tokens"] > 0
    # A text answer: a text_delta.
    body = {"model": "m", "max_tokens": 8, "stream": True, "messages": body["messages"]}
    got = events(post(srv, f"/sessions/{sid()}/v1/messages", body))
    assert got[2][1]["delta"] == {"type": "text_delta", "text": "echo: order"}


# -- errors --------------------------------------------------------------------------------


def test_error_shapes(srv: ServerProc) -> None:
    path = f"/sessions/{sid()}/v1/messages"
    ok = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(srv, path, b"{nope"), 400, "invalid_request_error", "invalid JSON body")
    assert_error(post(srv, path, {**ok, "max_tokens": None}), 400, "invalid_request_error",
                 "max_tokens is required")  # fmt: skip
    image = {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
    resp = post(srv, path, {**ok, "messages": [{"role": "user", "content": [image]}]})
    assert_error(resp, 400, "invalid_request_error", "messages[0].content[0] is a image block")
    doc = {"type": "document", "source": {"type": "text", "data": "d", "media_type": "text/plain"}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": [doc]}
    resp = post(srv, path, {**ok, "messages": [{"role": "user", "content": [result]}]})
    assert_error(resp, 400, "invalid_request_error", "a document block")
    web = {"type": "web_search_20250305", "name": "web_search"}
    assert_error(post(srv, path, {**ok, "tools": [web]}), 400, "invalid_request_error",
                 "tools[0] is a web_search_20250305 tool")  # fmt: skip
    prefill = [*ok["messages"], {"role": "assistant", "content": "The answer is"}]
    assert_error(post(srv, path, {**ok, "messages": prefill}), 400, "invalid_request_error",
                 "prefill")  # fmt: skip
    assert_error(srv.get(path), 405, "invalid_request_error", "method GET not allowed")
    bad_id = "/sessions/" + "x" * 200 + "/v1/messages"
    assert_error(post(srv, bad_id, ok), 400, "invalid_request_error", "")
    # Nothing above created the session.
    assert session(srv, path.split("/")[2])["records"] == []


def test_deleted_session_is_404_not_found_error(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        ask(client, [{"role": "user", "content": "hi"}])
        assert srv.delete(f"/sessions/{s}").status_code == 204
        with pytest.raises(anthropic.NotFoundError) as caught:
            ask(client, [{"role": "user", "content": "hi"}])
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": f"session not found: session_id={s}"},
    }


def test_history_that_does_not_extend_is_400(srv: ServerProc) -> None:
    s = sid()
    messages: list[Any] = [{"role": "user", "content": "q"}]
    with sdk(srv, s) as client:
        for _ in range(2):
            reply = ask(client, messages, tools=TOOLS, extra_body={"echo": {"tool_rounds": 5}})
            call = reply.content[0]
            messages += [
                {"role": "assistant", "content": reply.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id}]},
            ]
        with pytest.raises(anthropic.BadRequestError) as caught:
            ask(client, [{"role": "user", "content": "other"}], tools=TOOLS)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "rollback failed" in caught.value.body["error"]["message"]
    assert session(srv, s)["metadata"]["num_assistant"] == 2


def test_backend_errors(srv: ServerProc) -> None:
    s = sid()
    with sdk(srv, s) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            ask(client, [{"role": "user", "content": "x"}], tools=TOOLS,
                extra_body={"echo": {"fault": "bad_tool_arguments"}})  # fmt: skip
        assert caught.value.status_code == 502
        error = caught.value.body["error"]
        assert error["type"] == "api_error"
        assert "tool_calls[0].function.arguments is not a JSON object: '[1, 2]'" in error["message"]
        with pytest.raises(anthropic.APIStatusError) as caught:
            ask(client, [{"role": "user", "content": "x"}], extra_body={"echo": {"status": 503}})
        assert caught.value.status_code == 503
        assert caught.value.body["error"] == {
            "type": "api_error",
            "message": "backend answered 503: echo fault: status 503",
        }
        with pytest.raises(anthropic.InternalServerError) as caught:
            ask(
                client,
                [{"role": "user", "content": "x"}],
                extra_body={"echo": {"fault": "no_meta_info"}},
            )
        assert caught.value.status_code == 502
        assert caught.value.body["error"]["message"].startswith("malformed backend answer")
    assert session(srv, s)["records"] == []  # none of them recorded


def test_timeout_transport_and_size(server_factory, echo_factory) -> None:
    echo = echo_factory()
    srv = server_factory("--upstream", echo.url, "--upstream-timeout-s", "0.5",
                         "--max-body-bytes", "2000")  # fmt: skip
    path = f"/sessions/{sid()}/v1/messages"
    ok = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    resp = post(srv, path, {**ok, "echo": {"latency_ms": 3000}})
    assert_error(resp, 504, "timeout_error", "backend timeout")
    resp = post(srv, path, {**ok, "messages": [{"role": "user", "content": "x" * 3000}]})
    assert_error(resp, 413, "request_too_large", "exceeds 2000 bytes")
    echo.cleanup()
    resp = post(srv, path, ok)
    assert_error(resp, 502, "api_error", "backend transport error")


def test_count_tokens_without_tito_is_501(srv: ServerProc) -> None:
    with sdk(srv, sid()) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 501
    assert caught.value.body["error"]["type"] == "api_error"
    assert "needs token-in, token-out (TOKENIZER set)" in caught.value.body["error"]["message"]


def test_encoded_paths_are_the_messages_routes_never_forwarded(srv: ServerProc) -> None:
    s = sid()
    ok = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    resp = post(srv, f"/sessions/{s}/v1/%6Dessages", ok)
    assert resp.status_code == 200 and resp.json()["type"] == "message"
    assert len(session(srv, s)["records"]) == 1
    resp = srv.request("PUT", f"/sessions/{s}/v1/messages/", data=b"{}")
    assert_error(resp, 405, "invalid_request_error", "method PUT not allowed")
    resp = post(srv, f"/sessions/{s}/v1/messages/count%5Ftokens", ok)
    assert_error(resp, 501, "api_error", "count_tokens needs")
    resp = post(srv, "/sessions/bad%20id/v1/%6Dessages", ok)
    assert_error(resp, 400, "invalid_request_error", "")
    # Any other path keeps the generic route's error shape.
    resp = srv.get("/sessions/bad%20id/v1/models")
    assert resp.status_code == 400 and isinstance(resp.json()["error"], str)


# -- auth ----------------------------------------------------------------------------------


def test_x_api_key_and_bearer_and_nothing_upstream(server_factory) -> None:
    key = "sekrit-" + uuid.uuid4().hex
    with FakeUpstream() as fake:
        srv = server_factory("--upstream", fake.url, env={"ROLLOUT_SESSIONS_API_KEY": key})
        s = sid()
        with sdk(srv, s, api_key=key) as client:
            message = ask(client, [{"role": "user", "content": "with key"}])
            assert message.content[0].text
        # The generic proxy, authorised by x-api-key alone.
        resp = srv.get(f"/sessions/{s}/v1/models", headers={"x-api-key": key})
        assert resp.status_code == 200
        with sdk(srv, s, api_key=None, auth_token=key) as client:
            ask(client, [{"role": "user", "content": "with key"}])
        with sdk(srv, s, api_key="wrong") as client:
            with pytest.raises(anthropic.AuthenticationError) as caught:
                ask(client, [{"role": "user", "content": "x"}])
        assert caught.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "unauthorized"},
        }
        resp = post(srv, f"/sessions/{s}/v1/messages/count_tokens", {})
        assert_error(resp, 401, "authentication_error", "unauthorized")
        resp = post(srv, f"/sessions/{s}/v1/%6Dessages", {})  # encoded: the same route
        assert_error(resp, 401, "authentication_error", "unauthorized")
        # The other routes take x-api-key too, in their own error shape.
        assert srv.get(f"/sessions/{s}", headers={"x-api-key": key}).status_code == 200
        assert srv.get(f"/sessions/{s}", headers={"x-api-key": "no"}).json() == {
            "error": "unauthorized"
        }
        assert len(fake.requests) == 3
        for _method, _target, headers, _body in fake.requests:
            lowered = {k.lower(): v for k, v in headers.items()}
            assert key not in " ".join(lowered.values())
            assert "x-api-key" not in lowered and "authorization" not in lowered
            assert not any(k.startswith("anthropic-") for k in lowered if "chat" in _target)


# -- the two protocols in one session --------------------------------------------------


def test_chat_and_anthropic_turns_mix_in_one_session(srv: ServerProc) -> None:
    s = sid()
    chat_tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
        for t in TOOLS
    ]
    chat_messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "mixed"},
    ]
    oa = openai.OpenAI(base_url=f"{srv.url}/sessions/{s}/v1", api_key="x", max_retries=0)
    body = {"echo": {"tool_rounds": 3}}
    first = oa.chat.completions.create(
        model="m", messages=chat_messages, tools=chat_tools, max_tokens=256, extra_body=body
    )
    call = first.choices[0].message.tool_calls[0]
    # Turn 2 in Anthropic's words: the chat tool call as a tool_use block.
    messages: list[Any] = [
        {"role": "user", "content": "mixed"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.function.name,
                    "input": orjson.loads(call.function.arguments),
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "r1"}],
        },
    ]
    with sdk(srv, s) as client:
        second = ask(client, messages, tools=TOOLS, extra_body=body)
    assert second.stop_reason == "tool_use"
    # Turn 3 in chat again, with the assistant message as the record keeps it.
    got = session(srv, s)
    assert got["metadata"]["num_assistant"] == 2
    chat_messages = got["records"][1]["request"]["messages"]
    chat_messages += [
        got["records"][1]["response"]["choices"][0]["message"],
        {"role": "tool", "tool_call_id": second.content[0].id, "content": "r2"},
    ]
    oa.chat.completions.create(
        model="m", messages=chat_messages, tools=chat_tools, max_tokens=256, extra_body=body
    )
    oa.close()
    got = session(srv, s)
    assert got["metadata"]["num_assistant"] == 3
    ids = got["metadata"]["accumulated_token_ids"]
    for record in got["records"]:
        choice = record["response"]["choices"][0]
        assert ids[: len(choice["prompt_token_ids"])] == choice["prompt_token_ids"]
    samples = srv.post(f"/sessions/{s}/samples", json={}, headers={"accept": "application/json"})
    assert samples.status_code == 200
    assert len(samples.json()["metadata"]["turns"]) == 3


# -- count_tokens with a real tokenizer ------------------------------------------------


@pytest.fixture(scope="module")
def tito_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProc, ManagedProcess]]:
    tok = str(build_tokenizer(tmp_path_factory.mktemp("tok") / "qwen3", "qwen3", "append_only"))
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "qwen3")
    srv = serve("--upstream", echo.url, "--tokenizer", tok, "--tito-model", "qwen3")
    yield srv, echo
    srv.cleanup()
    echo.cleanup()


def test_count_tokens_is_the_prompt_the_turn_sends(tito_pair) -> None:
    srv, _echo = tito_pair
    s = sid()
    messages: list[Any] = [{"role": "user", "content": "count me, then call a tool"}]
    with sdk(srv, s) as client:
        counted = client.messages.count_tokens(model="m", system=SYSTEM, messages=messages,
                                               tools=TOOLS)  # fmt: skip
        assert session(srv, s)["records"] == []  # counting creates nothing
        first = ask(client, messages, tools=TOOLS)
        (record,) = session(srv, s)["records"]
        assert counted.input_tokens == len(record["request"]["input_ids"]) > 10
        assert first.usage.input_tokens == counted.input_tokens
        messages += [
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": first.content[0].id, "content": "ok"}
                ],
            },
        ]
        counted = client.messages.count_tokens(model="m", system=SYSTEM, messages=messages,
                                               tools=TOOLS)  # fmt: skip
        assert session(srv, s)["metadata"]["num_assistant"] == 1
        ask(client, messages, tools=TOOLS)
    second = session(srv, s)["records"][1]
    # The checkpoint plus the appended messages, exactly as the turn built them.
    assert counted.input_tokens == len(second["request"]["input_ids"])
    assert (
        second["request"]["input_ids"][: len(record["request"]["input_ids"])]
        == (record["request"]["input_ids"])
    )


def test_count_tokens_errors(tito_pair) -> None:
    srv, _echo = tito_pair
    s = sid()
    with sdk(srv, s) as client:
        ask(client, [{"role": "user", "content": "hi"}])
        srv.delete(f"/sessions/{s}")
        with pytest.raises(anthropic.NotFoundError):
            client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}])
    resp = post(srv, f"/sessions/{sid()}/v1/messages/count_tokens", {"messages": []})
    assert_error(resp, 400, "invalid_request_error", "messages must be a non-empty list")
