"""The HTTP contract of the session lifecycle, over real HTTP against `serve`.

Chat-turn semantics are tested in test_chat*.py; here chat appears only
where the lifecycle depends on it (restart tolerance, graceful shutdown).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import uuid

import pytest
import requests
from conftest import ServerProc
from prometheus_client.parser import text_string_to_metric_families

HEX32 = re.compile(r"^[0-9a-f]{32}$")
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}


def not_found(sid: str) -> dict[str, str]:
    return {"error": f"session not found: session_id={sid}"}


def fresh_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def metric_values(srv: ServerProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = srv.get("/metrics")
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def live(srv: ServerProc) -> float:
    return metric_values(srv)[("rollout_sessions_live_sessions", ())]


# --- health, first log line ---------------------------------------------------


def test_health(server: ServerProc) -> None:
    resp = server.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert re.fullmatch(r"[0-9a-f]{16,}", body["session_server_instance_id"])
    assert set(body) == {"status", "session_server_instance_id"}
    # Stable within one process.
    assert server.get("/health").json() == body


def test_first_log_line_names_embedded_echo(server: ServerProc) -> None:
    first = server.log().splitlines()[0]
    assert "no upstream configured: using embedded echo backend at http://127.0.0.1:" in first


# --- POST /sessions -----------------------------------------------------------


def test_mint(server: ServerProc) -> None:
    ids = set()
    for _ in range(5):
        resp = server.post("/sessions")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json")
        sid = resp.json()["session_id"]
        assert HEX32.match(sid)
        ids.add(sid)
    assert len(ids) == 5


@pytest.mark.parametrize("body", [b"{}", b'{"session_id": null}', b'{"other": 1}'])
def test_mint_with_body_without_id(server: ServerProc, body: bytes) -> None:
    resp = server.post("/sessions", data=body, headers={"content-type": "application/json"})
    assert resp.status_code == 200
    assert HEX32.match(resp.json()["session_id"])


def test_create_by_id(server: ServerProc) -> None:
    sid = fresh_id()
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code == 200
    assert resp.json() == {"session_id": sid}
    got = server.get(f"/sessions/{sid}")
    assert got.status_code == 200
    assert got.json()["session_id"] == sid


def test_create_by_id_live_is_409_and_changes_nothing(server: ServerProc) -> None:
    sid = fresh_id()
    assert server.post("/sessions", json={"session_id": sid}).status_code == 200
    before = server.get(f"/sessions/{sid}").json()
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code == 409
    assert resp.json() == {"error": f"session already exists: session_id={sid}"}
    assert server.get(f"/sessions/{sid}").json() == before


def test_create_by_id_deleted_is_404(server: ServerProc) -> None:
    sid = fresh_id()
    assert server.post("/sessions", json={"session_id": sid}).status_code == 200
    assert server.delete(f"/sessions/{sid}").status_code == 204
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code == 404
    assert resp.json() == not_found(sid)
    assert server.get(f"/sessions/{sid}").status_code == 404


def test_create_by_minted_id_after_delete_is_404(server: ServerProc) -> None:
    sid = server.post("/sessions").json()["session_id"]
    assert server.delete(f"/sessions/{sid}").status_code == 204
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code == 404
    assert resp.json() == not_found(sid)


@pytest.mark.parametrize(
    "bad_id",
    ["a" * 129, "a b", "a$b", "a/b", "a%20b", "", "ü", 5, ["x"], {"a": 1}],
    ids=[
        "too-long",
        "space",
        "dollar",
        "slash",
        "percent",
        "empty",
        "non-ascii",
        "int",
        "list",
        "obj",
    ],
)
def test_create_by_invalid_id_is_400(server: ServerProc, bad_id: object) -> None:
    n = live(server)
    resp = server.post("/sessions", json={"session_id": bad_id})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("invalid session id")
    assert live(server) == n


def test_create_by_id_max_length_ok(server: ServerProc) -> None:
    sid = "A-z.0~:_" * 16  # 128 characters, every allowed kind
    assert len(sid) == 128
    resp = server.post("/sessions", json={"session_id": sid})
    assert resp.status_code in (200, 409)  # 409 if a previous run of this module made it
    assert server.get(f"/sessions/{sid}").status_code == 200


@pytest.mark.parametrize("body", [b"{bad", b'{"session_id": "x"', b"nan", b"\xff\xfe", b"  "])
def test_malformed_json_is_400(server: ServerProc, body: bytes) -> None:
    n = live(server)
    resp = server.post("/sessions", data=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("invalid JSON body")
    assert live(server) == n


@pytest.mark.parametrize("body", [b"[1, 2]", b'"abc"', b"3"])
def test_non_object_json_is_400(server: ServerProc, body: bytes) -> None:
    resp = server.post("/sessions", data=body)
    assert resp.status_code == 400
    assert resp.json() == {"error": "invalid JSON body: expected a JSON object"}


# --- GET /sessions/{id} ---------------------------------------------------------


def test_get_live(server: ServerProc) -> None:
    sid = server.post("/sessions").json()["session_id"]
    resp = server.get(f"/sessions/{sid}")
    assert resp.status_code == 200
    body = resp.json()
    assert body["session_id"] == sid
    assert body["records"] == []
    assert body["metadata"]["accumulated_token_ids"] == []
    assert body["metadata"]["num_assistant"] == 0


def test_get_never_seen_is_empty_and_creates_nothing(server: ServerProc) -> None:
    n = live(server)
    for sid in (fresh_id("never"), uuid.uuid4().hex):
        resp = server.get(f"/sessions/{sid}")
        assert resp.status_code == 200
        assert resp.json() == {"session_id": sid, "records": [], "metadata": {}}
        # Nothing was created: DELETE does not find it, a create by id succeeds.
        assert server.delete(f"/sessions/{sid}").status_code == 404
        assert server.get(f"/sessions/{sid}").json()["metadata"] == {}
    assert live(server) == n
    sid = fresh_id("never")
    server.get(f"/sessions/{sid}")
    assert server.post("/sessions", json={"session_id": sid}).status_code == 200


def test_get_deleted_is_404(server: ServerProc) -> None:
    minted = server.post("/sessions").json()["session_id"]
    by_id = fresh_id()
    server.post("/sessions", json={"session_id": by_id})
    for sid in (minted, by_id):
        assert server.delete(f"/sessions/{sid}").status_code == 204
        resp = server.get(f"/sessions/{sid}")
        assert resp.status_code == 404
        assert resp.json() == not_found(sid)


# --- DELETE /sessions/{id} ------------------------------------------------------


def test_delete(server: ServerProc) -> None:
    sid = server.post("/sessions").json()["session_id"]
    resp = server.delete(f"/sessions/{sid}")
    assert resp.status_code == 204
    assert resp.content == b""
    again = server.delete(f"/sessions/{sid}")
    assert again.status_code == 404
    assert again.json() == not_found(sid)


def test_delete_never_seen_is_404_and_does_not_tombstone(server: ServerProc) -> None:
    sid = fresh_id("never")
    resp = server.delete(f"/sessions/{sid}")
    assert resp.status_code == 404
    assert resp.json() == not_found(sid)
    # The failed delete changed nothing: the id is still free to create.
    assert server.get(f"/sessions/{sid}").json()["metadata"] == {}
    assert server.post("/sessions", json={"session_id": sid}).status_code == 200


def test_delete_by_id_session_then_stale_retries(server: ServerProc) -> None:
    sid = fresh_id()
    server.post("/sessions", json={"session_id": sid})
    assert server.delete(f"/sessions/{sid}").status_code == 204
    for _ in range(3):
        assert server.get(f"/sessions/{sid}").status_code == 404
        assert server.delete(f"/sessions/{sid}").status_code == 404
        assert server.post("/sessions", json={"session_id": sid}).status_code == 404


def test_chat_on_deleted_is_404(server: ServerProc) -> None:
    sid = server.post("/sessions").json()["session_id"]
    assert server.delete(f"/sessions/{sid}").status_code == 204
    resp = server.post(f"/sessions/{sid}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 404
    assert resp.json() == not_found(sid)


# --- invalid ids on every route ---------------------------------------------------

BAD_PATH_IDS = ["a" * 129, "a%20b", "a$b", "a%2Fb", "a%00b", "%C3%BC"]


@pytest.mark.parametrize("raw_id", BAD_PATH_IDS)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")],
)
def test_invalid_id_is_400_on_every_route(
    server: ServerProc, raw_id: str, method: str, suffix: str
) -> None:
    kw = {"json": CHAT} if method == "POST" else {}
    resp = server.request(method, f"/sessions/{raw_id}{suffix}", **kw)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("invalid session id")


# --- unknown routes, docs, metrics ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/"),
        ("GET", "/sessions"),
        ("PUT", "/sessions"),
        ("POST", "/health"),
    ],
)
def test_unknown_route_is_404_json(server: ServerProc, method: str, path: str) -> None:
    resp = server.request(method, path)
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {"error": f"not found: {method} {path}"}


def test_openapi(server: ServerProc) -> None:
    resp = server.get("/openapi.json")
    assert resp.status_code == 200
    spec = json.loads(resp.content)
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    assert set(paths["/sessions"]) == {"post"}
    assert {"get", "delete"} <= set(paths["/sessions/{id}"])
    assert "post" in paths["/sessions/{id}/v1/chat/completions"]
    assert "get" in paths["/sessions/{id}/{path}"]
    assert "get" in paths["/health"] and "get" in paths["/metrics"]
    params = paths["/sessions/{id}"]["get"]["parameters"]
    assert params[0]["name"] == "id" and params[0]["in"] == "path"
    docs = server.get("/docs", allow_redirects=False)
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]


def test_metrics(server: ServerProc) -> None:
    sid = fresh_id()
    server.post("/sessions", json={"session_id": sid})
    server.delete(f"/sessions/{sid}")
    server.get(f"/sessions/{sid}")  # a refusal of a deleted id
    resp = server.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    values = metric_values(server)
    names = {name for name, _ in values}
    for name in [
        "rollout_sessions_live_sessions",
        "rollout_sessions_session_creates_total",
        "rollout_sessions_session_deletes_total",
        "rollout_sessions_tombstones",
        "rollout_sessions_tombstone_capacity",
        "rollout_sessions_tombstone_horizon_seconds",
        "rollout_sessions_tombstone_young_overwrites_total",
        "rollout_sessions_deleted_refusals_total",
        "rollout_sessions_ttl_evictions_total",
        "rollout_sessions_request_duration_seconds_bucket",
        "rollout_sessions_request_duration_seconds_count",
    ]:
        assert name in names, name
    kinds = {
        dict(labels)["kind"]
        for name, labels in values
        if name == "rollout_sessions_session_creates_total"
    }
    assert kinds == {"minted", "by_id", "auto"}
    assert values[("rollout_sessions_session_creates_total", (("kind", "by_id"),))] >= 1
    assert values[("rollout_sessions_session_deletes_total", ())] >= 1
    assert values[("rollout_sessions_tombstones", ())] >= 1
    assert values[("rollout_sessions_tombstone_capacity", ())] == 1048576
    assert values[("rollout_sessions_deleted_refusals_total", ())] >= 1
    # Latency is labelled by route template, never by raw path.
    routes = {
        dict(labels)["route"]
        for name, labels in values
        if name == "rollout_sessions_request_duration_seconds_count"
    }
    assert "/sessions/{id}" in routes and "/sessions" in routes
    assert not any(sid in r for r in routes)
    count = values[
        (
            "rollout_sessions_request_duration_seconds_count",
            (("method", "DELETE"), ("route", "/sessions/{id}")),
        )
    ]
    assert count >= 1


# --- small limits: body size, tombstone capacity, TTL --------------------------------


@pytest.fixture(scope="module")
def small_server() -> ServerProc:
    from conftest import serve

    srv = serve(
        "--max-body-bytes",
        "1024",
        "--tombstone-capacity",
        "4",
        "--retry-window-s",
        "3600",
    )
    yield srv
    srv.cleanup()


def test_body_over_limit_is_413(small_server: ServerProc) -> None:
    srv = small_server
    n = live(srv)
    pad = "x" * 2000
    resp = srv.post("/sessions", data=json.dumps({"session_id": "big", "pad": pad}))
    assert resp.status_code == 413
    assert resp.json() == {"error": "request body exceeds 1024 bytes"}
    # Chunked (no Content-Length): refused while streaming.
    chunks = (b"x" * 256 for _ in range(64))
    resp = srv.post("/sessions", data=chunks)
    assert resp.status_code == 413
    # Same on the chat route, and nothing was created by either.
    resp = srv.post(
        "/sessions/big/v1/chat/completions",
        data=json.dumps({**CHAT, "pad": pad}),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert srv.get("/sessions/big").json()["metadata"] == {}
    assert live(srv) == n
    # The connection is still usable, and a body at the limit is accepted.
    body = json.dumps({"session_id": fresh_id(), "pad": ""}).encode()
    body = body[:-2] + b"x" * (1024 - len(body)) + body[-2:]
    assert len(body) == 1024
    assert srv.post("/sessions", data=body).status_code == 200


def test_huge_declared_body_is_refused_without_reading(small_server: ServerProc, raw_factory):
    # Declare 1 GB and send only the head: the answer comes before any body byte.
    raw = raw_factory(small_server.url)
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    status, headers, body = raw.response()
    assert status == 413
    assert json.loads(body) == {"error": "request body exceeds 1024 bytes"}
    assert headers[b"connection"] == b"close"


def test_bodies_framed_by_content_length_keep_the_connection(
    server: ServerProc, raw_factory
) -> None:
    # The body is read up to its declared length and no further: the same
    # connection then serves the next requests, whether the body came in one
    # segment, split across segments, or pipelined with the next request.
    sid = server.post("/sessions").json()["session_id"]
    messages = [{"role": "user", "content": "hello"}]
    raw = raw_factory(server.url)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for turn in range(4):
        body = json.dumps({"model": "echo", "messages": messages}).encode()
        head = (
            f"POST /sessions/{sid}/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        if turn == 1:  # head and body in separate segments, the body in two
            raw.send(head)
            time.sleep(0.05)
            raw.send(body[:7])
            time.sleep(0.05)
            raw.send(body[7:])
        elif turn == 2:  # pipelined: this turn and a GET in one write
            raw.send(head + body + f"GET /sessions/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        else:
            raw.send(head + body)
        status, _, answer = raw.response()
        assert status == 200, (turn, status, answer)
        assistant = json.loads(answer)["choices"][0]["message"]
        messages = [*messages, assistant, {"role": "tool", "content": f"result {turn}"}]
        if turn == 2:
            status, _, snapshot = raw.response()
            assert status == 200
            assert json.loads(snapshot)["metadata"]["num_assistant"] == 3
    assert server.get(f"/sessions/{sid}").json()["metadata"]["num_assistant"] == 4


def test_young_overwrite_warning_and_metrics(small_server: ServerProc) -> None:
    srv = small_server
    ids = [fresh_id("tomb") for _ in range(7)]
    for sid in ids:
        assert srv.post("/sessions", json={"session_id": sid}).status_code == 200
        assert srv.delete(f"/sessions/{sid}").status_code == 204
    # Capacity 4: the first 3 deletes are forgotten, the last 4 still refused.
    for sid in ids[:3]:
        assert srv.get(f"/sessions/{sid}").json()["metadata"] == {}
    for sid in ids[3:]:
        assert srv.get(f"/sessions/{sid}").status_code == 404
    values = metric_values(srv)
    assert values[("rollout_sessions_tombstone_capacity", ())] == 4
    assert values[("rollout_sessions_tombstones", ())] == 4
    assert values[("rollout_sessions_tombstone_young_overwrites_total", ())] >= 3
    deadline = time.monotonic() + 5
    while "ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY" not in srv.log():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.1)
    warning = [line for line in srv.log().splitlines() if "TOMBSTONE_CAPACITY" in line]
    assert warning[0].startswith("[WARNING]")
    assert "--tombstone-capacity" in warning[0]
    # Rate-limited: more overwrites right away do not repeat the warning.
    for _ in range(3):
        sid = fresh_id("tomb")
        srv.post("/sessions", json={"session_id": sid})
        srv.delete(f"/sessions/{sid}")
    time.sleep(1.5)
    assert sum("TOMBSTONE_CAPACITY" in line for line in srv.log().splitlines()) == 1


def test_idle_ttl_eviction(server_factory) -> None:
    srv = server_factory("--session-ttl-s", "0.5")
    by_id = fresh_id("ttl")
    srv.post("/sessions", json={"session_id": by_id})
    minted = srv.post("/sessions").json()["session_id"]
    assert live(srv) == 2
    deadline = time.monotonic() + 5
    while live(srv) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    values = metric_values(srv)
    assert values[("rollout_sessions_ttl_evictions_total", ())] == 2
    # An expired foreign id is simply unknown again; an expired minted id stays refused.
    assert srv.get(f"/sessions/{by_id}").json()["metadata"] == {}
    assert srv.get(f"/sessions/{minted}").status_code == 404


# --- restart tolerance --------------------------------------------------------------


def test_restart_tolerance(server_factory) -> None:
    first = server_factory()
    instance = first.get("/health").json()["session_server_instance_id"]
    minted = first.post("/sessions").json()["session_id"]
    chatted = first.post("/sessions").json()["session_id"]
    assert first.post(f"/sessions/{chatted}/v1/chat/completions", json=CHAT).status_code == 200
    assert first.stop() == 0

    second = server_factory()
    assert second.get("/health").json()["session_server_instance_id"] != instance
    for sid in (minted, chatted):
        resp = second.get(f"/sessions/{sid}")
        assert resp.status_code == 200
        assert resp.json() == {"session_id": sid, "records": [], "metadata": {}}
        assert second.delete(f"/sessions/{sid}").status_code == 404
    # A running agent's next turn auto-creates the session on the new server.
    resp = second.post(f"/sessions/{minted}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text
    snap = second.get(f"/sessions/{minted}").json()
    assert len(snap["records"]) == 1
    assert snap["metadata"]["num_assistant"] == 1
    values = metric_values(second)
    assert values[("rollout_sessions_session_creates_total", (("kind", "auto"),))] == 1
    # And delete sticks for it from now on.
    assert second.delete(f"/sessions/{minted}").status_code == 204
    resp = second.post(f"/sessions/{minted}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 404


# --- graceful shutdown -----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_with_request_in_flight(server_factory, echo_factory, sig) -> None:
    echo = echo_factory(latency_ms=1500)
    srv = server_factory("--upstream", echo.url)
    sid = srv.post("/sessions").json()["session_id"]
    result: dict[str, object] = {}

    def slow_chat() -> None:
        try:
            resp = requests.post(
                f"{srv.url}/sessions/{sid}/v1/chat/completions", json=CHAT, timeout=30
            )
            result["status"] = resp.status_code
            result["body"] = resp.json()
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=slow_chat)
    thread.start()
    time.sleep(0.5)  # the chat is now waiting on the upstream
    started = time.monotonic()
    srv.send_signal(sig)
    time.sleep(0.4)
    # Stopped accepting: new connections are refused while the chat finishes.
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/health", timeout=2)
    thread.join(30)
    assert result.get("status") == 200, result
    assert result["body"]["choices"][0]["message"]["role"] == "assistant"
    assert srv.proc.wait(30) == 0
    assert time.monotonic() - started < 10
    assert "stopping: no new connections" in srv.log()


def test_restart_on_same_port_after_sigkill(server_factory) -> None:
    # A killed server frees its port at once, and nothing of it keeps
    # answering there with the old sessions.
    from rollout_sessions.testing.processes import free_port

    port = free_port()
    first = server_factory("--port", str(port), port=port)
    instance = first.get("/health").json()["session_server_instance_id"]
    sid = first.post("/sessions").json()["session_id"]
    first.proc.kill()
    first.proc.wait()
    second = server_factory("--port", str(port), port=port)
    for _ in range(20):  # fresh connections: none may reach an old worker
        resp = requests.get(f"{second.url}/health", timeout=5)
        assert resp.json()["session_server_instance_id"] != instance
    assert second.get(f"/sessions/{sid}").json()["metadata"] == {}
