"""The samples export against the real ``serve``: its metadata agrees with
itself after a cut, ``Accept`` is parsed as media types, and the same
trajectory exports the same bytes from any process."""

from __future__ import annotations

import json

import pytest
from conftest import ServerProc
from safetensors.numpy import load
from test_export import JSON, converse


def header(raw: bytes) -> dict:
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def test_num_assistant_agrees_with_turns_after_a_cut(srv: ServerProc) -> None:
    converse(srv, "cut-count", 3)
    full = srv.post("/sessions/cut-count/samples", json={}, headers=JSON).json()["metadata"]
    assert full["num_assistant"] == len(full["turns"]) == 3
    for cut_at, kept in [(full["turns"][1][0], 1), (full["turns"][1][0] + 1, 2)]:
        body = {"max_seq_len": cut_at}
        meta = srv.post("/sessions/cut-count/samples", json=body, headers=JSON).json()["metadata"]
        assert len(meta["turns"]) == kept and meta["num_assistant"] == kept
        raw = srv.post("/sessions/cut-count/samples", json=body).content
        text = header(raw)["__metadata__"]
        assert json.loads(text["num_assistant"]) == kept
        assert len(json.loads(text["turns"])) == kept


@pytest.mark.parametrize(
    ("accept", "wants_json"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("text/html, application/json;q=0.5", True),
        ("application/json, */*", True),
        ("application/json;q=0.9, application/octet-stream;q=0.5", True),
        ("application/jsonx", False),
        ("application/json-seq", False),
        ("text/application/json", False),
        ("application/json;q=0", False),
        ("application/json; q=0.000", False),
        ("application/json;q=0.5, application/octet-stream", False),
        ("application/json;q=0.5, */*;q=0.8", False),
        ("*/*", False),
        ("application/*", False),
        (None, False),
    ],
)
def test_accept_is_parsed_as_media_types(srv: ServerProc, accept, wants_json) -> None:
    converse(srv, "accept", 1)
    headers = {"Accept": accept}  # None: no Accept at all (requests drops it)
    resp = srv.post("/sessions/accept/samples", json={}, headers=headers)
    assert resp.status_code == 200
    if wants_json:
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["metadata"]["session_id"] == "accept"
    else:
        assert resp.headers["content-type"] == "application/octet-stream"
        assert load(resp.content)["tokens"].size > 0


def test_the_same_trajectory_exports_the_same_bytes_from_two_processes(server_factory) -> None:
    exports = []
    for _ in range(2):
        srv = server_factory()
        converse(srv, "same-bytes", 3)
        full = srv.post("/sessions/same-bytes/samples", json={}).content
        cut = srv.post("/sessions/same-bytes/samples", json={"max_seq_len": 12}).content
        exports.append((full, cut))
    (full_a, cut_a), (full_b, cut_b) = exports
    assert full_a == full_b and cut_a == cut_b
    meta = header(cut_a)["__metadata__"]
    assert set(meta) == {
        "session_id",
        "num_assistant",
        "turns",
        "length",
        "truncated",
        "original_length",
        "samples",  # linear mode's one sample, as tree mode lists one a leaf
    }
    assert load(cut_a)["tokens"].size == 12
    assert (8 + int.from_bytes(cut_a[:8], "little")) % 8 == 0  # the data stays aligned
