"""Ids ``.`` and ``..`` against the real ``serve``: HTTP clients remove dot
segments from paths (RFC 3986, 5.2.4), so a session under such an id could
never be addressed; they are 400 wherever an id enters, and nothing is created.
Raw sockets: a client library would normalise the path before sending it."""

from __future__ import annotations

import orjson
import pytest
from conftest import ServerProc
from rawhttp import Raw, request

CHAT = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
DOTS = [".", "..", "%2E", "%2e%2E", ".%2E"]
ROUTES = [
    ("GET", ""),
    ("HEAD", ""),
    ("DELETE", ""),
    ("POST", "/v1/chat/completions"),
    ("POST", "/samples"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
]


def live(srv: ServerProc) -> float:
    for line in srv.get("/metrics").text.splitlines():
        if line.startswith("rollout_sessions_live_sessions "):
            return float(line.split()[1])
    raise AssertionError("no live sessions gauge")


def expected_error(raw_id: str) -> str:
    sid = raw_id.replace("%2E", ".").replace("%2e", ".")
    return f"invalid session id: {sid!r} is a dot segment, which HTTP clients remove from paths"


@pytest.mark.parametrize("raw_id", DOTS)
@pytest.mark.parametrize(("method", "suffix"), ROUTES)
def test_a_dot_segment_id_is_400_on_every_route(server, raw_factory, raw_id, method, suffix):
    before = live(server)
    conn: Raw = raw_factory(server.url)
    body = CHAT if method == "POST" else None
    conn.send(request(method, f"/sessions/{raw_id}{suffix}", body))
    status, headers, data = conn.response(head=method == "HEAD")
    assert status == 400, data
    if method != "HEAD":
        assert orjson.loads(data) == {"error": expected_error(raw_id)}
    assert live(server) == before


@pytest.mark.parametrize("sid", [".", ".."])
def test_create_by_a_dot_segment_id_is_400(server, sid):
    before = live(server)
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code == 400
    assert resp.json() == {"error": expected_error(sid)}
    assert live(server) == before


@pytest.mark.parametrize("sid", ["...", ".a", "a.", "..b", "a..b"])
def test_ids_with_dots_that_are_not_dot_segments_are_valid(server, raw_factory, sid):
    assert server.post("/sessions", json={"session_id": sid}).status_code in (200, 409)
    conn: Raw = raw_factory(server.url)
    conn.send(request("GET", f"/sessions/{sid}"))
    status, _, data = conn.response()
    assert status == 200 and orjson.loads(data)["session_id"] == sid
    conn.send(request("DELETE", f"/sessions/{sid}"))
    assert conn.response()[0] == 204
