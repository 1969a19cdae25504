"""The official ``openai`` SDK against ``{server}/sessions/{id}/v1`` (embedded echo backend)."""

from __future__ import annotations

import uuid

import openai
import requests
from conftest import TOOLS, ServerProc


def client(server: ServerProc, sid: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/sessions/{sid}/v1", api_key="unused", max_retries=0, timeout=30
    )


def records(server: ServerProc, sid: str) -> list[dict]:
    return requests.get(f"{server.url}/sessions/{sid}", timeout=10).json()["records"]


def test_plain_completion_recorded(server: ServerProc):
    sid = uuid.uuid4().hex
    with client(server, sid) as sdk:
        completion = sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello sdk"}]
        )
        assert completion.choices[0].message.content == "echo: hello sdk"
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        assert [m.id for m in sdk.models.list()] == ["echo"]  # through the generic proxy
    (record,) = records(server, sid)
    assert record["response"]["id"] == completion.id
    assert record["request"]["model"] == "echo"


def test_streamed_completion_recorded(server: ServerProc):
    sid = uuid.uuid4().hex
    with client(server, sid) as sdk:
        stream = sdk.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "stream sdk"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream sdk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    (record,) = records(server, sid)
    assert record["response"]["choices"][0]["message"]["content"] == text


def test_tool_call_round_trip_with_sdk_messages(server: ServerProc):
    sid = uuid.uuid4().hex
    messages: list = [{"role": "user", "content": "weather in Paris?"}]
    with client(server, sid) as sdk:
        first = sdk.chat.completions.create(model="echo", messages=messages, tools=TOOLS)
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        call = message.tool_calls[0]
        assert call.function.name == "lookup"
        # Send the SDK's own message object back, as agents do.
        messages += [message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        streamed = sdk.chat.completions.stream(model="echo", messages=messages, tools=TOOLS)
        with streamed as events:
            final = events.get_final_completion()
        assert final.choices[0].message.content.startswith("echo: ")
    session = requests.get(f"{server.url}/sessions/{sid}", timeout=10).json()
    assert len(session["records"]) == 2
    assert session["metadata"]["num_assistant"] == 2
