"""TITO for every model family over real HTTP: ``serve --tokenizer`` with ``TITO_MODEL=auto``
and an echo backend that generates ids as a model of that family does (offline tokenizers in
each family's shape, testing/tokenizers.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ServerProc, serve

from rollout_sessions.testing.tokenizers import FAMILIES, build_tokenizer
from rollout_sessions.tito import Tito

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
START = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Look it up, then answer."},
]
ENCODER_KWARGS = {"deepseekv32": {"drop_thinking": False}, "deepseekv4": {"drop_thinking": False}}


class Kit(dict):
    """Tokenizers built on first use, each in a directory named after its family (so
    TITO_MODEL=auto goes by the name, as for a hub name)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, key: tuple[str, str]) -> Path:
        family, template = key
        path = build_tokenizer(self.root / template / family, family, template, merges=400)
        self[key] = path
        return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return Kit(tmp_path_factory.mktemp("families-http"))


@pytest.fixture
def pair(kit, request) -> Iterator[tuple[ServerProc, str]]:
    """A TITO server (TITO_MODEL=auto) for ``request.param`` = (family, template), with
    its embedded echo backend (no upstream), which generates with the server's own
    tokenizer, template and rule; and the family."""
    family, template = request.param
    env = {}
    if template == "append_only" and family in ENCODER_KWARGS:
        env["ROLLOUT_SESSIONS_CHAT_TEMPLATE_KWARGS"] = json.dumps(ENCODER_KWARGS[family])
    tok = str(kit[family, template])
    srv = serve("--tokenizer", tok, "--allowed-append-roles", "tool,user", env=env)
    yield srv, family
    srv.cleanup()


def converse(srv: ServerProc, sid: str, turns: int, **echo: Any) -> list[dict[str, Any]]:
    """Tool rounds first, then answers each followed by a user message."""
    messages = list(START)
    for turn in range(turns):
        control = {"tool_rounds": 2, "reasoning": f"Thinking about step {turn}.", **echo}
        body = {"model": "m", "messages": messages, "tools": TOOLS, "echo": control}
        resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        answer = resp.json()["choices"][0]["message"]
        messages = [*messages, answer]
        for call in answer.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"r{turn}"})
        if not answer.get("tool_calls"):
            messages.append({"role": "user", "content": f"And then {turn}?"})
    return messages


def tito_for(kit, family: str, template: str = "append_only") -> Tito:
    kwargs = ENCODER_KWARGS.get(family, {}) if template == "append_only" else {}
    return Tito.load(str(kit[family, template]), family, None, kwargs)


@pytest.mark.parametrize(
    ("pair", "trailing"),
    [((f, "append_only"), False) for f in FAMILIES]
    + [(("minimax_m25", "append_only"), True), (("qwen3", "append_only"), True)],
    indirect=["pair"],
    ids=[f for f in FAMILIES] + ["minimax_m25-trailing", "qwen3-trailing"],
)
def test_every_family_sends_the_whole_render_at_every_turn(kit, pair, trailing: bool) -> None:
    srv, family = pair
    log = srv.log()
    assert f"TITO_MODEL=auto chose {family}: tokenizer name" in log
    assert "TITO: the chat template renders append-only" in log
    tito = tito_for(kit, family)
    sid = srv.post("/sessions").json()["session_id"]
    converse(srv, sid, 5, **({"trailing": True} if trailing else {}))
    session = srv.get(f"/sessions/{sid}").json()
    records = session["records"]
    assert len(records) == 5
    for record in records:
        request = record["request"]
        expected = tito.encode(tito.render(request["messages"], TOOLS, True, tito.template_kwargs))
        assert request["input_ids"] == expected.tolist()
        assert record["response"]["choices"][0]["prompt_token_ids"] == request["input_ids"]
    assert "tito_mismatch" not in session["metadata"]
    checked = srv.get(f"/sessions/{sid}?tito_check=1").json()
    assert checked["metadata"]["tito_mismatch"] == []
    assert checked["records"] == records


@pytest.mark.parametrize("pair", [("kimi25", "stock")], indirect=True)
def test_a_stock_template_is_reported_at_start_up_and_the_server_serves(kit, pair) -> None:
    srv, _ = pair
    log = srv.log()
    assert "TITO_MODEL=auto chose kimi25" in log
    assert "TITO: the chat template is not append-only" in log
    assert "at message 2 (assistant)" in log
    assert "WARNING" in next(line for line in log.splitlines() if "not append-only" in line)
    # It serves, and every turn extends the stored trajectory.
    sid = srv.post("/sessions").json()["session_id"]
    messages = converse(srv, sid, 4)
    session = srv.get(f"/sessions/{sid}").json()
    records = session["records"]
    assert len(records) == 4
    for earlier, later in zip(records, records[1:], strict=False):
        choice = earlier["response"]["choices"][0]
        completion = [e[1] for e in choice["meta_info"]["output_token_logprobs"]]
        checkpoint = earlier["request"]["input_ids"] + completion
        assert later["request"]["input_ids"][: len(checkpoint)] == checkpoint
    # The whole render of the conversation differs where the template dropped reasoning.
    mismatch = srv.get(f"/sessions/{sid}?tito_check=1").json()["metadata"]["tito_mismatch"]
    assert mismatch, "the stock template re-renders earlier turns"
    first = mismatch[0]
    assert "Thinking about step 0." in first["stored_text"]
    assert "Thinking about step 0." not in first["rendered_text"]
    assert not first["same_text"]
    assert first["position"] < len(session["metadata"]["accumulated_token_ids"])
    assert messages[2]["reasoning_content"] == "Thinking about step 0."


def test_an_unknown_family_warns_and_serves(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<s>", "</s>"])
    template = "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>{% endfor %}"
    template += "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", chat_template=template
    ).save_pretrained(tmp_path / "mystery-model")
    tok = str(tmp_path / "mystery-model")
    srv = serve("--tokenizer", tok)  # its embedded echo backend generates with the same rule
    try:
        warning = next(line for line in srv.log().splitlines() if "TITO_MODEL=auto" in line)
        assert "WARNING" in warning and "of no known model family" in warning
        assert "boundary rule default" in srv.log()
        resp = srv.post("/sessions/m-1/v1/chat/completions", json={"messages": START})
        assert resp.status_code == 200, resp.text
        ids = resp.json()["choices"][0]["prompt_token_ids"]
        tito = Tito.load(tok, "default")
        assert ids == tito.first_turn(START, None).tolist()
    finally:
        srv.cleanup()


@pytest.mark.parametrize("pair", [("qwen3", "append_only")], indirect=True)
def test_tito_check_bad_values_and_never_seen_ids(pair) -> None:
    srv, _ = pair
    resp = srv.get("/sessions/never-seen-1?tito_check=1")
    assert resp.status_code == 200
    assert resp.json() == {"session_id": "never-seen-1", "records": [], "metadata": {}}
    resp = srv.get("/sessions/never-seen-1?tito_check=maybe")
    assert resp.status_code == 400
    assert resp.json() == {"error": "tito_check must be 1 or 0, got 'maybe'"}
    sid = srv.post("/sessions").json()["session_id"]
    assert srv.get(f"/sessions/{sid}?tito_check=1").json()["metadata"]["tito_mismatch"] == []
    assert "tito_mismatch" not in srv.get(f"/sessions/{sid}?tito_check=0").json()["metadata"]


def test_tito_check_without_tito_is_400(server: ServerProc) -> None:
    resp = server.get("/sessions/x-1?tito_check=1")
    assert resp.status_code == 400
    assert resp.json() == {"error": "tito_check needs token-in, token-out (set TOKENIZER)"}
    assert requests.get(server.url + "/sessions/x-1", timeout=5).json()["metadata"] == {}
