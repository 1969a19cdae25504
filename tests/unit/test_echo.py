"""The echo backend on its own (in-process, real HTTP): format, token ids, control fields."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from rollout_sessions.echo import EchoBackend, prompt_tokens, start_echo_backend

FORCED = {"logprobs": True, "return_prompt_token_ids": True, "return_meta_info": True}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def run(test: Callable[[EchoBackend, aiohttp.ClientSession], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        echo = await start_echo_backend(**kw)
        try:
            async with aiohttp.ClientSession() as http:
                return await test(echo, http)
        finally:
            await echo.close()

    return asyncio.run(main())


async def chat(echo: EchoBackend, http: aiohttp.ClientSession, body: dict) -> tuple[int, Any]:
    async with http.post(echo.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw


def test_token_ids_extend_across_tool_turns():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        messages: list[dict] = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "héllo"},
        ]
        previous: list[int] = []
        for turn in range(4):
            status, answer = await chat(
                echo,
                http,
                {"messages": messages, "tools": TOOLS, "echo": {"tool_rounds": 3}, **FORCED},
            )
            assert status == 200
            choice = answer["choices"][0]
            prompt = choice["prompt_token_ids"]
            assert prompt[: len(previous)] == previous
            assert prompt == prompt_tokens(messages)
            meta = choice["meta_info"]
            completion = [entry[1] for entry in meta["output_token_logprobs"]]
            assert meta["completion_tokens"] == len(completion)
            assert answer["usage"]["completion_tokens"] == len(completion)
            previous = prompt + completion
            message = choice["message"]
            if turn < 3:
                assert choice["finish_reason"] == "tool_calls"
                assert message["tool_calls"][0]["function"]["name"] == "lookup"
                assert message["content"] == ""
                messages = [
                    *messages,
                    message,
                    {
                        "role": "tool",
                        "tool_call_id": message["tool_calls"][0]["id"],
                        "content": "r",
                    },
                ]
            else:
                assert choice["finish_reason"] == "stop"
                assert message["content"].startswith("echo: ")

    run(body)


def test_flags_honoured_like_sglang():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        _, plain = await chat(echo, http, {"messages": [{"role": "user", "content": "x"}]})
        choice = plain["choices"][0]
        assert "meta_info" not in choice and "prompt_token_ids" not in choice
        _, forced = await chat(
            echo, http, {"messages": [{"role": "user", "content": "x"}], **FORCED}
        )
        assert "output_token_logprobs" in forced["choices"][0]["meta_info"]

    run(body)


def test_faults_and_status():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        msgs = [{"role": "user", "content": "x"}]

        async def fault(name: str) -> tuple[int, Any]:
            return await chat(echo, http, {"messages": msgs, "echo": {"fault": name}, **FORCED})

        assert "meta_info" not in (await fault("no_meta_info"))[1]["choices"][0]
        meta = (await fault("no_logprobs"))[1]["choices"][0]["meta_info"]
        assert "output_token_logprobs" not in meta
        assert (await fault("content_none"))[1]["choices"][0]["message"]["content"] is None
        meta = (await fault("count_mismatch"))[1]["choices"][0]["meta_info"]
        assert meta["completion_tokens"] == len(meta["output_token_logprobs"]) + 1
        assert "prompt_token_ids" not in (await fault("no_prompt_ids"))[1]["choices"][0]
        assert (await fault("not_json")) == (200, b"this is not json")
        status, err = await chat(echo, http, {"messages": msgs, "echo": {"status": 503}})
        assert status == 503 and "503" in err["error"]["message"]
        try:
            await fault("close")
        except aiohttp.ClientError:
            pass
        else:
            raise AssertionError("close fault answered")
        try:
            await fault("reset_mid_body")
        except aiohttp.ClientError:
            pass
        else:
            raise AssertionError("reset_mid_body fault answered")
        try:
            async with asyncio.timeout(0.3):
                await fault("hang")
        except TimeoutError:
            pass
        else:
            raise AssertionError("hang fault answered")

    run(body)


def test_input_ids_are_the_prompt():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        msgs = [{"role": "user", "content": "x"}]
        status, answer = await chat(
            echo, http, {"messages": msgs, "input_ids": [7, 8, 9], **FORCED}
        )
        assert status == 200
        assert answer["choices"][0]["prompt_token_ids"] == [7, 8, 9]
        assert answer["usage"]["prompt_tokens"] == 3

    run(body)


def test_latency_overlaps_and_stats():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                chat(echo, http, {"messages": [{"role": "user", "content": str(i)}]})
                for i in range(8)
            )
        )
        elapsed = time.perf_counter() - start
        assert all(status == 200 for status, _ in results)
        assert elapsed < 0.6 * 4, elapsed  # 8 x 0.3 s serially would be 2.4 s
        async with http.get(echo.url + "/echo/stats") as resp:
            stats = await resp.json()
        assert stats["chat_requests"] == 8 and stats["max_concurrent"] >= 4
        assert stats["inflight"] == 0
        _, slow = await chat(
            echo, http, {"messages": [{"role": "user", "content": "x"}], "echo": {"latency_ms": 0}}
        )
        assert slow["object"] == "chat.completion"

    run(body, latency_s=0.3)


def test_other_routes():
    async def body(echo: EchoBackend, http: aiohttp.ClientSession) -> None:
        async with http.get(echo.url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "echo"
        async with http.put(
            echo.url + "/any/where?a=1", data=b"payload", headers={"X-Test": "yes"}
        ) as resp:
            described = await resp.json()
        assert described["method"] == "PUT"
        assert described["path"] == "/any/where" and described["query"] == "a=1"
        assert described["body"] == "payload"
        assert ["x-test", "yes"] in [[k.lower(), v] for k, v in described["headers"]]
        async with http.get(echo.url + "/echo/status/418") as resp:
            assert resp.status == 418
        async with http.post(echo.url + "/v1/completions", json={"prompt": "abc"}) as resp:
            assert (await resp.json())["choices"][0]["text"] == "echo: abc"

    run(body)
