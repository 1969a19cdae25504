"""Token-in, token-out over real HTTP: ``serve --tokenizer`` and an echo backend that
honours ``input_ids`` and makes real ids with the same offline tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ServerProc, serve
from transformers import AutoTokenizer

from rollout_sessions.testing.processes import ManagedProcess, start_echo
from rollout_sessions.testing.tokenizers import build_tokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
START = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Look it up, then answer."},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        "qwen3": build_tokenizer(root / "qwen3", "qwen3", "append_only"),
        "qwen3-stock": build_tokenizer(root / "qwen3-stock", "qwen3", "stock"),
        "glm47": build_tokenizer(root / "glm47", "glm47", "append_only"),
    }


@pytest.fixture(scope="module")
def pair(tokenizer_dirs) -> Iterator[tuple[ServerProc, ManagedProcess, Any]]:
    """A TITO server (qwen3 rule) and its tokenizing echo backend."""
    tok = str(tokenizer_dirs["qwen3"])
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "qwen3")
    srv = serve(
        "--upstream", echo.url, "--tokenizer", tok, "--tito-model", "qwen3",
        "--allowed-append-roles", "tool,user",
    )  # fmt: skip
    yield srv, echo, AutoTokenizer.from_pretrained(tok)
    srv.cleanup()
    echo.cleanup()


def chat(srv: ServerProc, sid: str, messages: list[dict], **echo: Any) -> requests.Response:
    body: dict[str, Any] = {"model": "m", "messages": messages, "tools": TOOLS}
    if echo:
        body["echo"] = echo
    return srv.post(f"/sessions/{sid}/v1/chat/completions", json=body)


def converse(srv: ServerProc, sid: str, turns: int, follow_up: str = "tool", **echo: Any):
    messages = list(START)
    answers = []
    for turn in range(turns):
        resp = chat(srv, sid, messages, tool_rounds=turns - 1, **echo)
        assert resp.status_code == 200, resp.text
        answer = resp.json()["choices"][0]["message"]
        answers.append(resp.json())
        follow = (
            {"role": "tool", "tool_call_id": f"c{turn}", "content": f"result {turn}"}
            if follow_up == "tool"
            else {"role": "user", "content": f"and then {turn}?"}
        )
        messages = [*messages, answer, follow]
    return messages, answers


def sent_bodies(echo: ManagedProcess) -> list[dict]:
    return requests.get(echo.url + "/echo/requests", timeout=5).json()["requests"]


@pytest.mark.slow
def test_first_log_lines_say_whether_tito_is_on(pair, server: ServerProc) -> None:
    srv, _, _ = pair
    assert "TITO (token-in, token-out) is on" in srv.log()
    assert "boundary rule qwen3" in srv.log()
    assert "TITO (token-in, token-out) is off" in server.log()


@pytest.mark.parametrize("drift", [False, True])
def test_every_turn_sends_input_ids_that_extend_the_checkpoint(pair, drift: bool) -> None:
    srv, echo, tokenizer = pair
    sid = srv.post("/sessions").json()["session_id"]
    messages, _ = converse(srv, sid, 4, drift=drift)
    session = srv.get(f"/sessions/{sid}").json()
    records = session["records"]
    assert len(records) == 4
    newline = tokenizer.encode("\n", add_special_tokens=False)
    checkpoint: list[int] = []
    for k, record in enumerate(records):
        input_ids = record["request"]["input_ids"]
        choice = record["response"]["choices"][0]
        assert choice["prompt_token_ids"] == input_ids  # the backend generated from them
        if k:
            assert input_ids[: len(checkpoint) + 1] == checkpoint + newline
        checkpoint = input_ids + [e[1] for e in choice["meta_info"]["output_token_logprobs"]]
        assert record["request"]["messages"] == messages[: 2 + 2 * k]
        assert record["request_timestamp"] <= record["timestamp"]
    assert session["metadata"]["accumulated_token_ids"] == checkpoint
    # The prompt the server built is the template's render of the conversation.
    last_prompt = tokenizer.decode(records[-1]["request"]["input_ids"])
    rendered = tokenizer.apply_chat_template(
        messages[:8], tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert last_prompt == rendered


def test_retrying_the_last_turn_sends_the_same_input_ids(pair) -> None:
    srv, echo, _ = pair
    sid = srv.post("/sessions").json()["session_id"]
    messages, _ = converse(srv, sid, 2)
    retry = messages[:-2]  # the last turn again
    first_try = sent_bodies(echo)[-1]["input_ids"]
    assert chat(srv, sid, retry, tool_rounds=1).status_code == 200
    assert sent_bodies(echo)[-1]["input_ids"] == first_try
    assert srv.get(f"/sessions/{sid}").json()["metadata"]["num_assistant"] == 2


def test_an_upstream_that_ignores_input_ids_is_502_and_nothing_is_recorded(pair) -> None:
    srv, _, _ = pair
    sid = srv.post("/sessions").json()["session_id"]
    resp = chat(srv, sid, START, fault="bad_prompt_ids")
    assert resp.status_code == 502
    assert "differ from the input_ids sent" in resp.json()["error"]
    assert srv.get(f"/sessions/{sid}").json()["records"] == []


def test_replay_payloads_stay_in_the_record_only(pair) -> None:
    srv, _, _ = pair
    sid = srv.post("/sessions").json()["session_id"]
    resp = chat(srv, sid, START, replay=True)
    assert resp.status_code == 200
    meta = resp.json()["choices"][0]["meta_info"]
    assert "routed_experts" not in meta and "indexer_topk" not in meta
    assert "output_token_logprobs" in meta
    (record,) = srv.get(f"/sessions/{sid}").json()["records"]
    kept = record["response"]["choices"][0]["meta_info"]
    assert kept["routed_experts"] == "AAECAw==" and kept["indexer_topk"] == [[4], [5]]


def test_refused_requests_change_nothing(pair) -> None:
    srv, echo, _ = pair
    sid = srv.post("/sessions").json()["session_id"]
    messages, _ = converse(srv, sid, 3)
    before = srv.get(f"/sessions/{sid}").json()
    sent = len(sent_bodies(echo))
    bad = [
        [*messages[:-1], {"role": "developer", "content": "x"}],  # a role not allowed
        [*START[:1], {"role": "user", "content": "changed"}],  # two steps back
        messages[:3] + [{"role": "tool", "content": "other"}],  # two steps back
    ]
    for request in bad:
        resp = chat(srv, sid, request)
        assert resp.status_code == 400, resp.text
    assert len(sent_bodies(echo)) == sent  # refused before the upstream
    assert srv.get(f"/sessions/{sid}").json() == before


@pytest.mark.slow
def test_a_stock_template_breaks_re_rendering_but_not_tito(tokenizer_dirs) -> None:
    # Qwen3's stock template drops earlier <think> blocks once a user message
    # follows: a backend that re-renders no longer extends the trajectory.
    tok = str(tokenizer_dirs["qwen3-stock"])
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "qwen3")
    roles = ("--allowed-append-roles", "tool,user")
    plain = serve("--upstream", echo.url, *roles)
    tito = serve("--upstream", echo.url, "--tokenizer", tok, "--tito-model", "qwen3", *roles)
    try:
        outcomes = {}
        for name, srv in (("plain", plain), ("tito", tito)):
            messages = list(START)
            codes = []
            for turn in range(3):
                resp = srv.post(
                    "/sessions/stock-1/v1/chat/completions",
                    json={"messages": messages, "echo": {"reasoning": f"think {turn}"}},
                )
                codes.append(resp.status_code)
                if resp.status_code != 200:
                    break
                answer = resp.json()["choices"][0]["message"]
                messages = [*messages, answer, {"role": "user", "content": f"next {turn}"}]
            outcomes[name] = codes
        assert outcomes["tito"] == [200, 200, 200]
        assert outcomes["plain"] == [200, 500]
    finally:
        for proc in (plain, tito, echo):
            proc.cleanup()


@pytest.mark.slow
def test_glm47_drops_the_stop_token_that_opens_the_next_message(tokenizer_dirs) -> None:
    tok = str(tokenizer_dirs["glm47"])
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "glm47")
    srv = serve("--upstream", echo.url, "--tokenizer", tok, "--tito-model", "glm47")
    try:
        messages, _ = converse(srv, "glm-1", 3)
        session = srv.get("/sessions/glm-1").json()
        assert session["metadata"]["max_trim_tokens"] == 1
        tokenizer = AutoTokenizer.from_pretrained(tok)
        observation = tokenizer.convert_tokens_to_ids("<|observation|>")
        records = session["records"]
        for earlier, later in zip(records, records[1:], strict=False):
            choice = earlier["response"]["choices"][0]
            completion = [e[1] for e in choice["meta_info"]["output_token_logprobs"]]
            assert completion[-1] == observation  # it stopped at a tool call
            checkpoint = earlier["request"]["input_ids"] + completion
            # The next prompt keeps the checkpoint but its last token, then
            # renders <|observation|> again as the tool result's opener.
            assert later["request"]["input_ids"][: len(checkpoint)] == checkpoint
        # GLM's template iterates tool-call arguments as an object: they are parsed
        # first, as SGLang does.
        as_objects = [
            {
                **m,
                "tool_calls": [
                    {**c, "function": {**c["function"], "arguments": json.loads(a)}}
                    for c in m["tool_calls"]
                    for a in [c["function"]["arguments"]]
                ],
            }
            if m.get("tool_calls")
            else m
            for m in messages[:6]
        ]
        rendered = tokenizer.apply_chat_template(
            as_objects, tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        assert "<arg_key>query</arg_key>" in rendered
        assert tokenizer.decode(records[-1]["request"]["input_ids"]) == rendered
    finally:
        srv.cleanup()
        echo.cleanup()


def test_template_kwargs_from_settings_and_request(tokenizer_dirs) -> None:
    tok = str(tokenizer_dirs["qwen3-stock"])
    echo = start_echo(0.0, "--tokenizer", tok, "--tito-model", "qwen3")
    env = {"ROLLOUT_SESSIONS_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}'}
    srv = serve("--upstream", echo.url, "--tokenizer", tok, "--tito-model", "qwen3", env=env)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok)
        resp = srv.post("/sessions/kw-1/v1/chat/completions", json={"messages": START})
        assert resp.status_code == 200
        off = tokenizer.decode(resp.json()["choices"][0]["prompt_token_ids"])
        body = {"messages": START, "chat_template_kwargs": {"enable_thinking": True}}
        resp = srv.post("/sessions/kw-2/v1/chat/completions", json=body)
        on = tokenizer.decode(resp.json()["choices"][0]["prompt_token_ids"])
        assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    finally:
        srv.cleanup()
        echo.cleanup()
