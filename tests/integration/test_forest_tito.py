"""Tree mode with token-in, token-out over real HTTP: a turn's ``input_ids`` are the
attach node's stored path tokens plus only the appended messages' tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import ServerProc, serve

from rollout_sessions.testing.processes import ManagedProcess, start_echo
from rollout_sessions.testing.tokenizers import build_tokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
START = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Look it up, then answer."},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, ManagedProcess]]:
    tok = str(build_tokenizer(tmp_path_factory.mktemp("tok") / "qwen3", "qwen3", "append_only"))
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "qwen3")
    srv = serve(
        "--upstream", echo.url, "--tokenizer", tok, "--tito-model", "qwen3",
        "--trajectory", "tree", "--no-journal",
    )  # fmt: skip
    yield srv, echo
    srv.cleanup()
    echo.cleanup()


def chat(srv: ServerProc, sid: str, messages: list[dict], **echo: Any) -> requests.Response:
    body: dict[str, Any] = {"model": "m", "messages": messages, "tools": TOOLS, "echo": echo}
    return srv.post(f"/sessions/{sid}/v1/chat/completions", json=body)


def last_sent(echo: ManagedProcess) -> dict:
    return requests.get(echo.url + "/echo/requests", timeout=5).json()["requests"][-1]


def tool(i: int, text: str = "") -> dict:
    return {"role": "tool", "tool_call_id": f"c{i}", "content": text or f"result {i}"}


def test_a_deep_retry_sends_the_attach_nodes_stored_tokens(pair) -> None:
    srv, echo = pair
    sid = "tito-tree"
    messages = list(START)
    for i in range(3):
        resp = chat(srv, sid, messages, tool_rounds=9)
        assert resp.status_code == 200, resp.text
        messages = [*messages, resp.json()["choices"][0]["message"], tool(i)]
    every = srv.get(f"/sessions/{sid}?records=all").json()["records"]
    node0 = every[0]["response"]["choices"][0]
    path0 = node0["prompt_token_ids"] + [e[1] for e in node0["meta_info"]["output_token_logprobs"]]
    # retry two steps back: the tool result after node 0 changes
    retry = [*messages[:3], tool(0, "different")]
    resp = chat(srv, sid, retry, tool_rounds=9)
    assert resp.status_code == 200, resp.text
    sent = last_sent(echo)["input_ids"]
    assert sent[: len(path0)] == path0  # stored tokens, never re-rendered
    tree = srv.get(f"/sessions/{sid}").json()["metadata"]["tree"]
    assert tree["nodes"][3]["parent"] == 0
    # a compaction renders a new root whole
    summary = [START[0], {"role": "user", "content": "summary"}]
    assert chat(srv, sid, summary).status_code == 200
    assert srv.get(f"/sessions/{sid}").json()["metadata"]["tree"]["nodes"][4]["parent"] is None


def test_appended_roles_are_checked_after_an_attach_node(pair) -> None:
    srv, echo = pair
    sid = "tito-tree-roles"
    resp = chat(srv, sid, START)
    assert resp.status_code == 200
    answer = resp.json()["choices"][0]["message"]
    before = requests.get(echo.url + "/echo/stats", timeout=5).json()["chat_requests"]
    resp = chat(srv, sid, [*START, answer, {"role": "user", "content": "more"}])
    assert resp.status_code == 400 and "role" in resp.json()["error"]
    assert requests.get(echo.url + "/echo/stats", timeout=5).json()["chat_requests"] == before
    assert len(srv.get(f"/sessions/{sid}").json()["metadata"]["tree"]["nodes"]) == 1
