"""Chat turns through a session, over real HTTP: server and echo backend subprocesses.

Covers the trajectory (tool-call conversation, checkpoints, rollback), the
records, the split-lock races restated from the production suites, upstream
failures and streaming.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import requests
from conftest import TOOLS, ServerProc, serve

from rollout_sessions.testing.processes import ManagedProcess as EchoProc
from rollout_sessions.testing.processes import free_port

RECORD_KEYS = {
    "timestamp",
    "request_timestamp",
    "method",
    "path",
    "status_code",
    "request",
    "response",
}


@pytest.fixture(scope="module")
def strict_srv(echo: EchoProc) -> Iterator[ServerProc]:
    """Short upstream timeout, small body limit, system messages allowed after assistants."""
    proc = serve(
        "--upstream",
        echo.url,
        "--upstream-timeout-s",
        "1",
        "--max-body-bytes",
        "4096",
        "--allowed-append-roles",
        "tool,system",
    )
    yield proc
    proc.cleanup()


def new_id() -> str:
    return uuid.uuid4().hex


def chat(srv: ServerProc, sid: str, messages: list[dict], timeout: float = 30, **extra: Any):
    return requests.post(
        f"{srv.url}/sessions/{sid}/v1/chat/completions",
        json={"messages": messages, **extra},
        timeout=timeout,
    )


def get(srv: ServerProc, sid: str) -> requests.Response:
    return requests.get(f"{srv.url}/sessions/{sid}", timeout=10)


def delete(srv: ServerProc, sid: str) -> requests.Response:
    return requests.delete(f"{srv.url}/sessions/{sid}", timeout=30)


def create(srv: ServerProc) -> str:
    resp = requests.post(f"{srv.url}/sessions", timeout=10)
    assert resp.status_code == 200
    return resp.json()["session_id"]


def echo_stats(echo: EchoProc) -> dict:
    return requests.get(echo.url + "/echo/stats", timeout=5).json()


def echo_reset(echo: EchoProc) -> None:
    requests.post(echo.url + "/echo/reset", timeout=5)


def wait_inflight(echo: EchoProc, at_least: int = 1, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if echo_stats(echo)["inflight"] >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError("request did not reach the backend in time")


def tool_result(assistant: dict, text: str) -> dict:
    return {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": text}


def run_tool_turns(srv: ServerProc, sid: str, turns: int) -> tuple[list[dict], list[dict]]:
    """``turns`` tool-call turns; returns (messages to send next, assistant messages)."""
    messages = [
        {"role": "system", "content": "You are a tool user."},
        {"role": "user", "content": "Find the weather in Paris."},
    ]
    assistants = []
    for turn in range(turns):
        resp = chat(srv, sid, messages, tools=TOOLS, echo={"tool_rounds": 10})
        assert resp.status_code == 200, resp.text
        assistant = resp.json()["choices"][0]["message"]
        assistants.append(assistant)
        messages = [*messages, assistant, tool_result(assistant, f"result {turn}")]
    return messages, assistants


# --- the trajectory -----------------------------------------------------------


def test_multi_turn_tool_conversation_checkpoints_grow(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    messages = [
        {"role": "system", "content": "You are a tool user."},
        {"role": "user", "content": "Find the weather in Paris, then in Rome."},
    ]
    checkpoints: list[list[int]] = []
    for turn in range(4):
        final = turn == 3
        # The client asks for no logprobs: the server forces them anyway.
        resp = chat(
            srv,
            sid,
            messages,
            tools=TOOLS,
            logprobs=False,
            return_meta_info=False,
            no_stop_trim=True,
            echo={"tool_rounds": 3},
        )
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        choice = answer["choices"][0]
        assistant = choice["message"]
        if final:
            assert choice["finish_reason"] == "stop" and assistant["content"].startswith("echo:")
        else:
            assert choice["finish_reason"] == "tool_calls"
            assert assistant["tool_calls"][0]["function"]["name"] == "lookup"

        session = get(srv, sid).json()
        assert session["session_id"] == sid
        records = session["records"]
        assert len(records) == turn + 1
        record = records[-1]
        assert set(record) == RECORD_KEYS
        assert record["method"] == "POST"
        assert record["path"] == "/v1/chat/completions"
        assert record["status_code"] == 200
        assert record["response"] == answer
        forced = record["request"]
        assert forced["logprobs"] is True
        assert forced["return_prompt_token_ids"] is True
        assert forced["return_meta_info"] is True
        assert forced["no_stop_trim"] is False
        assert forced["messages"] == messages
        assert forced["tools"] == TOOLS

        meta = session["metadata"]
        assert meta["num_assistant"] == turn + 1
        completion = [entry[1] for entry in choice["meta_info"]["output_token_logprobs"]]
        assert meta["accumulated_token_ids"] == choice["prompt_token_ids"] + completion
        if checkpoints:
            previous = checkpoints[-1]
            assert meta["accumulated_token_ids"][: len(previous)] == previous
            assert len(meta["accumulated_token_ids"]) > len(previous)
        checkpoints.append(meta["accumulated_token_ids"])
        if not final:
            messages = [*messages, assistant, tool_result(assistant, f"sunny {turn}")]

    # What the backend received carried the forced flags too.
    sent = requests.get(echo.url + "/echo/requests", timeout=5).json()["requests"][-1]
    assert sent["logprobs"] is True and sent["return_meta_info"] is True
    assert sent["return_prompt_token_ids"] is True and sent["no_stop_trim"] is False


def test_reserialized_assistant_message_still_extends(srv: ServerProc):
    sid = new_id()
    _, assistants = run_tool_turns(srv, sid, 1)
    a = assistants[0]
    # What an SDK or a JSON round trip may send back: null content, extra fields, index.
    replay = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "function_call": None,
        "tool_calls": [{**a["tool_calls"][0], "index": 0}],
    }
    messages = [
        {"role": "system", "content": "You are a tool user."},
        {"role": "user", "content": "Find the weather in Paris."},
        replay,
        tool_result(a, "result 0"),
    ]
    resp = chat(srv, sid, messages, tools=TOOLS, echo={"tool_rounds": 10})
    assert resp.status_code == 200, resp.text
    meta = get(srv, sid).json()["metadata"]
    assert meta["num_assistant"] == 2


def test_one_step_rollback_accepted(srv: ServerProc):
    sid = new_id()
    messages, assistants = run_tool_turns(srv, sid, 2)
    before = get(srv, sid).json()
    first_checkpoint_len = len(before["records"][0]["response"]["choices"][0]["prompt_token_ids"])

    # Retry the second turn with a different tool result: one assistant step back.
    retry = [*messages[:3], tool_result(assistants[0], "a different result")]
    resp = chat(srv, sid, retry, tools=TOOLS, echo={"tool_rounds": 10})
    assert resp.status_code == 200, resp.text
    after = get(srv, sid).json()
    assert len(after["records"]) == 2
    assert after["records"][0] == before["records"][0]
    assert after["records"][1]["request"]["messages"] == retry
    assert after["metadata"]["num_assistant"] == 2
    assert after["metadata"]["accumulated_token_ids"] != before["metadata"]["accumulated_token_ids"]
    assert len(after["metadata"]["accumulated_token_ids"]) > first_checkpoint_len

    # The new branch is extended normally afterwards.
    a2 = resp.json()["choices"][0]["message"]
    resp = chat(srv, sid, [*retry, a2, tool_result(a2, "next")], tools=TOOLS)
    assert resp.status_code == 200, resp.text
    assert get(srv, sid).json()["metadata"]["num_assistant"] == 3


def test_two_step_rollback_refused_without_change(srv: ServerProc, echo: EchoProc):
    sid = new_id()
    messages, assistants = run_tool_turns(srv, sid, 3)
    before = get(srv, sid).content
    sent_before = echo_stats(echo)["chat_requests"]

    retry = [*messages[:3], tool_result(assistants[0], "a different result")]
    resp = chat(srv, sid, retry, tools=TOOLS)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("rollback failed")
    assert get(srv, sid).content == before
    assert echo_stats(echo)["chat_requests"] == sent_before  # refused before the upstream


def test_append_role_outside_allowed_refused(srv: ServerProc, strict_srv: ServerProc):
    for server, allowed in ((srv, False), (strict_srv, True)):
        sid = new_id()
        resp = chat(server, sid, [{"role": "user", "content": "hi"}])
        assert resp.status_code == 200
        a = resp.json()["choices"][0]["message"]
        before = get(server, sid).content
        extra = [{"role": "user", "content": "hi"}, a, {"role": "system", "content": "go on"}]
        resp = chat(server, sid, extra)
        if allowed:
            assert resp.status_code == 200, resp.text
            assert get(server, sid).json()["metadata"]["num_assistant"] == 2
        else:
            assert resp.status_code == 400
            assert "appended message at index 2 has role='system'" in resp.json()["error"]
            assert get(server, sid).content == before


def test_bad_requests_change_nothing(srv: ServerProc):
    sid = new_id()
    url = f"{srv.url}/sessions/{sid}/v1/chat/completions"
    assert requests.post(url, data=b"{not json", timeout=5).status_code == 400
    assert requests.post(url, data=b"[1, 2]", timeout=5).status_code == 400
    resp = requests.post(url, json={"messages": []}, timeout=5)
    assert resp.status_code == 400 and "messages" in resp.json()["error"]
    resp = requests.post(url, json={"messages": ["hi"]}, timeout=5)
    assert resp.status_code == 400
    # The never-seen id was not auto-created by the bad requests.
    assert get(srv, sid).json() == {"session_id": sid, "records": [], "metadata": {}}
    resp = requests.post(f"{srv.url}/sessions/bad%20id/v1/chat/completions", json={}, timeout=5)
    assert resp.status_code == 400


def test_body_over_limit_413(strict_srv: ServerProc):
    sid = new_id()
    resp = chat(strict_srv, sid, [{"role": "user", "content": "x" * 10_000}])
    assert resp.status_code == 413
    assert get(strict_srv, sid).json()["metadata"] == {}


# --- lifecycle ---------------------------------------------------------------


def test_chat_on_never_seen_id_auto_creates(srv: ServerProc):
    sid = new_id()
    assert get(srv, sid).json()["metadata"] == {}
    resp = chat(srv, sid, [{"role": "user", "content": "hello"}])
    assert resp.status_code == 200
    session = get(srv, sid).json()
    assert len(session["records"]) == 1
    assert session["metadata"]["num_assistant"] == 1


def test_chat_on_deleted_id_404(srv: ServerProc):
    sid = create(srv)
    assert chat(srv, sid, [{"role": "user", "content": "hello"}]).status_code == 200
    assert delete(srv, sid).status_code == 204
    resp = chat(srv, sid, [{"role": "user", "content": "hello"}])
    assert resp.status_code == 404
    assert resp.json() == {"error": f"session not found: session_id={sid}"}
    assert get(srv, sid).status_code == 404


# --- concurrency (split lock) -----------------------------------------------


def test_same_session_concurrent_turns_reach_backend_one_wins(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    warm = chat(srv, sid, [{"role": "user", "content": "warmup"}])
    assert warm.status_code == 200
    assistant = warm.json()["choices"][0]["message"]
    retry = [{"role": "user", "content": "warmup"}, assistant, {"role": "tool", "content": "t"}]
    echo_reset(echo)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(chat, srv, sid, retry, echo={"latency_ms": 300}) for _ in range(4)]
        responses = [f.result(timeout=30) for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    stats = echo_stats(echo)
    assert stats["chat_requests"] == 4
    assert stats["max_concurrent"] >= 2  # they overlapped at the backend
    session = get(srv, sid).json()
    assert len(session["records"]) == 2  # exactly one of the four was recorded
    assert session["metadata"]["num_assistant"] == 2


def test_different_sessions_overlap_at_backend(srv: ServerProc, echo: EchoProc):
    n = 8
    echo_reset(echo)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [
            pool.submit(
                chat,
                srv,
                new_id(),
                [{"role": "user", "content": f"p{i}"}],
                echo={"latency_ms": 500},
            )
            for i in range(n)
        ]
        responses = [f.result(timeout=30) for f in futures]
    elapsed = time.monotonic() - start
    assert all(r.status_code == 200 for r in responses)
    assert elapsed < 1.5, f"{n} sessions x 0.5 s took {elapsed:.2f} s: not parallel"
    assert echo_stats(echo)["max_concurrent"] >= n // 2


def test_delete_completes_while_chat_is_mid_upstream(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    echo_reset(echo)
    payload = [{"role": "user", "content": "slow"}]
    with ThreadPoolExecutor(max_workers=2) as pool:
        inflight = pool.submit(chat, srv, sid, payload, echo={"latency_ms": 600})
        wait_inflight(echo)
        t0 = time.monotonic()
        deleted = delete(srv, sid)
        delete_time = time.monotonic() - t0
        answer = inflight.result(timeout=30)
        answer_time = time.monotonic() - t0
    assert deleted.status_code == 204
    assert delete_time < 0.4, "DELETE waited for the upstream call"
    # CANCEL_ON_DELETE (default on): the upstream call is cancelled, not awaited.
    assert answer.status_code == 404
    assert answer.json() == {"error": f"session not found: session_id={sid}"}
    assert answer_time < 0.4, "the turn waited for the backend's answer"
    assert get(srv, sid).status_code == 404
    assert chat(srv, sid, payload).status_code == 404


def test_chat_arriving_during_delete_gets_404(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    echo_reset(echo)
    payload = [{"role": "user", "content": "slow-chat"}]
    with ThreadPoolExecutor(max_workers=3) as pool:
        chat_a = pool.submit(chat, srv, sid, payload, echo={"latency_ms": 500})
        wait_inflight(echo)
        deleting = pool.submit(delete, srv, sid)
        time.sleep(0.05)
        chat_b = chat(srv, sid, payload, timeout=10)
        assert chat_b.status_code == 404
        assert chat_a.result(timeout=30).status_code == 404  # cancelled (CANCEL_ON_DELETE)
        assert deleting.result(timeout=30).status_code == 204


def test_concurrent_deletes_one_204_one_404(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    echo_reset(echo)
    with ThreadPoolExecutor(max_workers=3) as pool:
        chatting = pool.submit(
            chat, srv, sid, [{"role": "user", "content": "hold"}], echo={"latency_ms": 300}
        )
        wait_inflight(echo)
        d1 = pool.submit(delete, srv, sid)
        time.sleep(0.02)
        d2 = pool.submit(delete, srv, sid)
        codes = sorted([d1.result(timeout=30).status_code, d2.result(timeout=30).status_code])
        assert chatting.result(timeout=30).status_code == 404  # cancelled (CANCEL_ON_DELETE)
    assert codes == [204, 404]


def test_chats_queued_around_a_delete(srv: ServerProc, echo: EchoProc):
    sid = create(srv)
    echo_reset(echo)
    payload = [{"role": "user", "content": "queued"}]
    with ThreadPoolExecutor(max_workers=6) as pool:
        chats = [pool.submit(chat, srv, sid, payload, echo={"latency_ms": 300}) for _ in range(3)]
        wait_inflight(echo)
        deleting = pool.submit(delete, srv, sid)
        late = [pool.submit(chat, srv, sid, payload) for _ in range(2)]
        codes = [f.result(timeout=30).status_code for f in chats + late]
        assert deleting.result(timeout=30).status_code == 204
    # In flight at the backend: cancelled (CANCEL_ON_DELETE). The late ones raced
    # the DELETE: answered before it, or 404 after it.
    assert codes[:3] == [404] * 3, codes
    assert set(codes) <= {200, 404}, codes
    assert get(srv, sid).status_code == 404


def test_rapid_create_chat_delete_cycles(srv: ServerProc):
    def cycle(i: int) -> list[int]:
        codes = []
        with requests.Session() as http:
            for j in range(6):
                sid = http.post(f"{srv.url}/sessions", timeout=10).json()["session_id"]
                url = f"{srv.url}/sessions/{sid}"
                body = {"messages": [{"role": "user", "content": f"cycle-{i}-{j}"}]}
                codes.append(
                    http.post(url + "/v1/chat/completions", json=body, timeout=10).status_code
                )
                codes.append(http.delete(url, timeout=10).status_code)
                codes.append(http.get(url, timeout=10).status_code)
                codes.append(
                    http.post(url + "/v1/chat/completions", json=body, timeout=10).status_code
                )
        return codes

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(cycle, range(8), timeout=60))
    for codes in results:
        assert codes == [200, 204, 404, 404] * 6


# --- upstream failures ---------------------------------------------------------


def test_upstream_down_502(server_factory):
    down = server_factory("--upstream", f"http://127.0.0.1:{free_port()}")
    sid = new_id()
    resp = chat(down, sid, [{"role": "user", "content": "hi"}])
    assert resp.status_code == 502
    assert resp.json()["error"].startswith("backend transport error: ")
    assert get(down, sid).json()["records"] == []


def test_upstream_slower_than_timeout_504(strict_srv: ServerProc):
    sid = new_id()
    start = time.monotonic()
    resp = chat(strict_srv, sid, [{"role": "user", "content": "hi"}], echo={"fault": "hang"})
    assert resp.status_code == 504
    assert "timeout" in resp.json()["error"]
    assert time.monotonic() - start < 5
    assert get(strict_srv, sid).json()["records"] == []
    # The pool recovers: the next turn goes through.
    assert chat(strict_srv, sid, [{"role": "user", "content": "hi"}]).status_code == 200


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ("no_meta_info", "meta_info and output_token_logprobs must be in"),
        ("no_logprobs", "meta_info and output_token_logprobs must be in"),
        ("content_none", "content is None"),
        ("count_mismatch", "completion_tokens="),
        ("no_prompt_ids", "prompt_token_ids is missing"),
        ("not_json", "not JSON"),
        ("close", "backend transport error"),
    ],
)
def test_malformed_upstream_answer_502(srv: ServerProc, fault: str, needle: str):
    sid = new_id()
    assert chat(srv, sid, [{"role": "user", "content": "first"}]).status_code == 200
    before = get(srv, sid).content
    first = orjson.loads(before)["records"][0]["response"]["choices"][0]["message"]
    messages = [{"role": "user", "content": "first"}, first, {"role": "tool", "content": "t"}]
    resp = chat(srv, sid, messages, echo={"fault": fault})
    assert resp.status_code == 502
    assert needle in resp.json()["error"]
    assert get(srv, sid).content == before


def test_non_200_passes_through_unrecorded(srv: ServerProc):
    sid = new_id()
    resp = chat(srv, sid, [{"role": "user", "content": "hi"}], echo={"status": 503})
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "echo fault: status 503"
    assert get(srv, sid).json()["records"] == []


def test_checkpoint_mismatch_500_state_unchanged(srv: ServerProc):
    sid = new_id()
    first = chat(srv, sid, [{"role": "user", "content": "one"}])
    assert first.status_code == 200
    before = get(srv, sid).content
    a = first.json()["choices"][0]["message"]
    messages = [{"role": "user", "content": "one"}, a, {"role": "tool", "content": "t"}]
    resp = chat(srv, sid, messages, echo={"fault": "bad_prompt_ids"})
    assert resp.status_code == 500
    assert resp.json()["error"].startswith("pretokenized prefix mismatch")
    assert get(srv, sid).content == before


# --- streaming ---------------------------------------------------------------


def test_stream_true_answers_sse_and_records(srv: ServerProc):
    sid = new_id()
    messages = [{"role": "user", "content": "stream me"}]
    resp = chat(srv, sid, messages, stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [block for block in resp.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(block[6:]) for block in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "echo: stream me"
    assert chunks[-1]["usage"]["total_tokens"] > 0

    record = get(srv, sid).json()["records"][0]
    assert "stream" not in record["request"] and "stream_options" not in record["request"]
    assert record["response"]["choices"][0]["message"]["content"] == content


def test_retrying_the_first_turn_starts_over(srv: ServerProc):
    sid = new_id()
    user = {"role": "user", "content": "first"}
    assert chat(srv, sid, [user]).status_code == 200
    assert chat(srv, sid, [user], temperature=0.5).status_code == 200
    records = get(srv, sid).json()["records"]
    assert len(records) == 1
    assert records[0]["request"]["temperature"] == 0.5


def test_non_ascii_content_recorded_as_sent_and_invalid_unicode_refused(
    srv: ServerProc, echo: EchoProc
):
    sid = new_id()
    message = {"role": "user", "content": "你好, naïve café \U0001d11e"}
    assert chat(srv, sid, [message]).status_code == 200
    sent = requests.get(echo.url + "/echo/requests", timeout=5).json()["requests"][-1]
    assert sent["messages"] == [message]
    before = get(srv, sid).content
    assert orjson.loads(before)["records"][0]["request"]["messages"] == [message]
    for body in (
        rb'{"messages":[{"role":"user","content":"\ud800"}]}',
        b'{"messages":[{"role":"user","content":"\xff"}]}',
    ):
        resp = requests.post(
            f"{srv.url}/sessions/{sid}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 400
        assert "invalid JSON body" in resp.json()["error"]
    assert get(srv, sid).content == before
