"""``POST /sessions/{id}/samples`` over real HTTP: the trajectory as one training sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TOOLS, ServerProc
from safetensors.numpy import load

JSON = {"Accept": "application/json"}


def converse(srv: ServerProc, sid: str, turns: int) -> dict:
    messages = [{"role": "user", "content": "look it up"}]
    for turn in range(turns):
        body = {"messages": messages, "tools": TOOLS, "echo": {"tool_rounds": turns - 1}}
        resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        answer = resp.json()["choices"][0]["message"]
        messages = [*messages, answer, {"role": "tool", "content": f"r{turn}"}]
    return srv.get(f"/sessions/{sid}").json()


def test_the_sample_agrees_with_the_records_token_for_token(srv: ServerProc) -> None:
    session = converse(srv, "sample-1", 3)
    resp = srv.post("/sessions/sample-1/samples", json={})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    arrays = load(resp.content)
    tokens, mask, logprobs = arrays["tokens"], arrays["loss_mask"], arrays["rollout_log_probs"]
    assert (tokens.dtype, mask.dtype, logprobs.dtype) == (np.int32, np.uint8, np.float32)
    assert tokens.tolist() == session["metadata"]["accumulated_token_ids"]
    generated: list[int] = []
    expected_lp: list[float] = []
    for record in session["records"]:
        choice = record["response"]["choices"][0]
        entries = choice["meta_info"]["output_token_logprobs"]
        start = len(choice["prompt_token_ids"])
        assert tokens[start : start + len(entries)].tolist() == [e[1] for e in entries]
        assert mask[start : start + len(entries)].all()
        generated += [e[1] for e in entries]
        expected_lp += [e[0] for e in entries]
    assert tokens[mask == 1].tolist() == generated
    assert np.allclose(logprobs[mask == 1], np.array(expected_lp, dtype=np.float32))
    assert (logprobs[mask == 0] == 0).all()


def test_json_and_metadata(srv: ServerProc) -> None:
    converse(srv, "sample-2", 2)
    body = srv.post("/sessions/sample-2/samples", json={}, headers=JSON).json()
    meta = body["metadata"]
    assert meta["session_id"] == "sample-2" and meta["num_assistant"] == 2
    assert meta["truncated"] is False and meta["length"] == len(body["tokens"])
    for start, stop in meta["turns"]:
        assert body["loss_mask"][start:stop] == [1] * (stop - start)
    # safetensors: an 8-byte header length, then the JSON header with __metadata__.
    raw = srv.post("/sessions/sample-2/samples", json={}).content
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["session_id"] == "sample-2"
    assert json.loads(header["__metadata__"]["turns"]) == meta["turns"]


def test_max_seq_len_cuts_and_says_so(srv: ServerProc) -> None:
    converse(srv, "sample-3", 2)
    full = srv.post("/sessions/sample-3/samples", json={}, headers=JSON).json()
    cut = srv.post("/sessions/sample-3/samples", json={"max_seq_len": 10}, headers=JSON).json()
    assert cut["tokens"] == full["tokens"][:10]
    assert cut["loss_mask"] == full["loss_mask"][:10]
    assert cut["metadata"]["truncated"] is True
    assert cut["metadata"]["original_length"] == len(full["tokens"])
    assert all(stop <= 10 for _, stop in cut["metadata"]["turns"])


def test_never_seen_is_empty_and_creates_nothing_deleted_is_404(srv: ServerProc) -> None:
    body = srv.post("/sessions/sample-never/samples", json={}, headers=JSON).json()
    assert body["tokens"] == [] and body["metadata"]["num_assistant"] == 0
    assert srv.get("/sessions/sample-never").json()["metadata"] == {}
    converse(srv, "sample-gone", 1)
    assert srv.delete("/sessions/sample-gone").status_code == 204
    resp = srv.post("/sessions/sample-gone/samples", json={})
    assert resp.status_code == 404
    assert resp.json() == {"error": "session not found: session_id=sample-gone"}


@pytest.mark.parametrize("body", [b'{"max_seq_len": 0}', b'{"max_seq_len": "8"}', b"[1]", b"{"])
def test_a_bad_body_is_400(srv: ServerProc, body: bytes) -> None:
    resp = srv.post("/sessions/sample-bad/samples", data=body)
    assert resp.status_code == 400
    assert "error" in resp.json()
