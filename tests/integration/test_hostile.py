"""Hostile clients and misbehaving upstreams, each against the real ``serve`` over
real sockets: nobody corrupts a trajectory, stalls other clients or grows
memory without bound. One test (or a few) per defect of the old transport."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
from conftest import ServerProc, serve
from fake_upstream import FakeUpstream
from rawhttp import Raw, request

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv

MSG = [{"role": "user", "content": "hello"}]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def chat(srv: ServerProc, sid: str, messages: list[dict[str, Any]], **extra: Any):
    return srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": messages, **extra})


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


# --- 1. an answer is matched to its own request only ----------------------------------


@pytest.mark.parametrize("mode", ["extra_same_write", "extra_late"])
def test_stray_upstream_answers_never_reach_another_session(server_factory, fake, mode):
    fake.mode = mode
    srv = server_factory("--upstream", fake.url)
    sids = [srv.post("/sessions").json()["session_id"] for _ in range(4)]
    for turn, sid in enumerate(sids):
        content = f"question {turn} of {sid}"
        resp = chat(srv, sid, [{"role": "user", "content": content}], timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == f"answer to {content}"
        time.sleep(0.4)  # the late stray arrives while the connection idles in the pool
    for turn, sid in enumerate(sids):
        (record,) = srv.get(f"/sessions/{sid}").json()["records"]
        content = f"question {turn} of {sid}"
        assert record["request"]["messages"][-1]["content"] == content
        assert record["response"]["choices"][0]["message"]["content"] == f"answer to {content}"


# --- 2. timeouts and the connection cap -----------------------------------------------

TIMEOUTS = ("--header-timeout-s", "1", "--keep-alive-s", "2.5")


@pytest.fixture(scope="module")
def timed() -> Iterator[ServerProc]:
    srv = serve(*TIMEOUTS)
    yield srv
    srv.cleanup()


def closed_within(raw: Raw, low: float, high: float, started: float) -> None:
    assert raw.closed_by_server(timeout=high + 1)
    elapsed = time.monotonic() - started
    assert low <= elapsed <= high + 0.5, elapsed


def test_a_connection_that_never_sends_is_closed(timed, raw_factory):
    started = time.monotonic()
    raw = raw_factory(timed.url)
    closed_within(raw, 0.9, 1.5, started)


def test_a_trickled_head_is_closed_at_the_deadline(timed, raw_factory):
    raw = raw_factory(timed.url)
    started = time.monotonic()
    head = request("GET", "/health")
    with pytest.raises(OSError):  # noqa: PT012 - the send fails once the server closed
        for byte in head:
            raw.send(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > 3:
                break
    assert time.monotonic() - started < 2.0


def test_a_trickled_body_is_408_and_the_connection_ends(timed, raw_factory):
    raw = raw_factory(timed.url)
    body = json.dumps({"messages": MSG}).encode()
    raw.send(request("POST", "/sessions/trickle-1/v1/chat/completions", body)[: -len(body)])
    started = time.monotonic()
    for byte in body[:3]:
        raw.send(bytes([byte]))
        time.sleep(0.2)
    status, headers, answer = raw.response()
    assert status == 408
    assert json.loads(answer)["error"] == "request body not complete within 1 s"
    assert headers[b"connection"] == b"close"
    assert raw.closed_by_server()
    assert time.monotonic() - started < 2.5
    # Nothing was created by the refused turn.
    assert timed.get("/sessions/trickle-1").json()["metadata"] == {}


def test_idle_keep_alive_is_closed_after_its_own_timeout(timed, raw_factory):
    raw = raw_factory(timed.url)
    raw.send(request("GET", "/health"))
    assert raw.response()[0] == 200
    started = time.monotonic()
    # Past the head deadline (1 s) the idle connection is still usable ...
    time.sleep(1.5)
    raw.send(request("GET", "/health"))
    assert raw.response()[0] == 200
    # ... and it is closed 2.5 s after its last answer.
    started = time.monotonic()
    closed_within(raw, 2.3, 2.6, started)


def test_over_the_connection_cap_existing_clients_keep_working(fake):
    # 300 descriptors: 256 stay reserved, so at most 44 client connections.
    port = free_port()
    argv = ["bash", "-c", 'ulimit -n 300 && exec "$@"', "serve"]
    argv += serve_argv(port, "--upstream", fake.url)
    with ManagedProcess(argv, port) as proc:
        proc.wait_healthy()
        keeper = requests.Session()
        sid = keeper.post(proc.url + "/sessions", timeout=5).json()["session_id"]
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        try:
            time.sleep(0.5)
            resp = keeper.post(
                f"{proc.url}/sessions/{sid}/v1/chat/completions", json={"messages": MSG}, timeout=10
            )
            assert resp.status_code == 200, resp.text
            assert proc.alive()
        finally:
            for hog in hogs:
                hog.close()
        # Once the hogs are gone, new clients are served again.
        time.sleep(0.5)
        assert requests.get(proc.url + "/health", timeout=5).status_code == 200
        keeper.close()


# --- 3. pipelining with backpressure --------------------------------------------------


def test_a_client_that_never_reads_cannot_stall_others_or_grow_memory(server, raw_factory):
    before = rss_kib(server.pid)
    hog = raw_factory(server.url)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.send(request("GET", "/metrics") * 2600)
    time.sleep(1.0)
    started = time.monotonic()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5
    assert rss_kib(server.pid) - before < 40 * 1024


def test_pipelined_requests_are_answered_in_order(server, raw_factory):
    raw = raw_factory(server.url)
    ids = [f"pipe-{i}" for i in range(20)]
    raw.send(b"".join(request("GET", f"/sessions/{sid}") for sid in ids))
    for sid in ids:
        status, _, body = raw.response()
        assert status == 200 and json.loads(body)["session_id"] == sid


# --- 4. bodies cost their size --------------------------------------------------------


def test_a_body_in_tiny_chunks_costs_its_size(server_factory, raw_factory):
    srv = server_factory()
    before = rss_kib(srv.pid, "VmHWM")
    raw = raw_factory(srv.url)
    payload = b'{"session_id": "chunky", "pad": "' + b"x" * (4 << 20) + b'"}'
    head = (
        b"POST /sessions HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    parts = [payload[i : i + 2] for i in range(0, len(payload), 2)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    raw.sock.settimeout(60)
    raw.send(head + chunks + b"0\r\n\r\n")
    status, _, body = raw.response()
    assert status == 200 and json.loads(body) == {"session_id": "chunky"}
    # A bytes object per 2-byte chunk would cost ~70 MiB; one buffer costs the
    # 4 MiB body and its parsed form.
    assert rss_kib(srv.pid, "VmHWM") - before < 20 * 1024


# --- 5. bodies the server cannot handle are 400 and create nothing --------------------


@pytest.mark.parametrize("depth", [300, 1000, 1100])
def test_nesting_too_deep_is_400_and_creates_nothing(server, depth):
    sid = f"deep-{depth}"
    body = b'{"messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * depth
    body += b"]" * depth + b"}"
    resp = server.post(f"/sessions/{sid}/v1/chat/completions", data=body)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith(("invalid chat request", "invalid JSON body"))
    assert server.get(f"/sessions/{sid}").json()["metadata"] == {}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": 5, "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": "x", "tool_calls": "x"}]},
        {"messages": [{"role": "user", "content": "x", "tool_calls": [5]}]},
        {"messages": MSG, "tools": {"a": 1}},
        {"messages": MSG, "stream": "yes"},
    ],
)
def test_wrong_types_are_400_and_create_nothing(server, body):
    resp = server.post("/sessions/typed/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("invalid chat request")
    assert server.get("/sessions/typed").json()["metadata"] == {}


# --- 6. the generic proxy never carries a chat turn -----------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "v1/chat/%63ompletions",
        "v1%2Fchat%2Fcompletions",
        "v1/chat/completions/",
        "v1/chat/completions;x",  # path parameters some servers drop
        "v1;a/chat/completions",
        "v1/chat/completions%3Fa=1",  # a query that decoding reveals
        "v1/chat/completions%23frag",
    ],
)
def test_an_encoded_chat_path_is_the_chat_route(srv, echo, path):
    sid = srv.post("/sessions").json()["session_id"]
    assert srv.delete(f"/sessions/{sid}").status_code == 204
    resp = srv.post(f"/sessions/{sid}/{path}", json={"messages": MSG})
    assert resp.status_code == 404
    assert resp.json()["error"] == f"session not found: session_id={sid}"

    live = srv.post("/sessions").json()["session_id"]
    resp = srv.post(f"/sessions/{live}/{path}", json={"messages": MSG, "logprobs": False})
    assert resp.status_code == 200
    sent = requests.get(echo.url + "/echo/requests", timeout=5).json()["requests"][-1]
    assert sent["logprobs"] is True
    assert len(srv.get(f"/sessions/{live}").json()["records"]) == 1
    assert srv.get(f"/sessions/{live}/{path}").status_code == 405


# --- 7. redirects are passed back, never followed -------------------------------------


def test_upstream_redirects_are_answered_not_followed(server_factory, fake):
    fake.mode = "redirect"
    srv = server_factory("--upstream", fake.url)
    for resp in (
        srv.get("/sessions/any/v1/models", allow_redirects=False),
        srv.post(
            "/sessions/any/v1/chat/completions", json={"messages": MSG}, allow_redirects=False
        ),
    ):
        assert resp.status_code == 302
        assert resp.headers["location"] == f"{fake.url}/elsewhere"
    assert fake.elsewhere_visits == 0
    assert srv.get("/sessions/any").json()["records"] == []


# --- 8. upstream answers are validated completely before anything is recorded ---------


def good_answer() -> dict[str, Any]:
    from fake_upstream import chat_answer

    return chat_answer({"messages": MSG})


@pytest.mark.parametrize(
    ("mutate", "stream", "needle"),
    [
        (lambda a: a["choices"][0].update(prompt_token_ids=[1, "x"]), False, "non-integer"),
        (lambda a: a["choices"][0]["message"].update(tool_calls=5), True, "tool_calls"),
        (lambda a: a["choices"][0]["message"].update(content=7), False, "content"),
    ],
)
def test_defective_answers_are_502_and_unrecorded(server_factory, fake, mutate, stream, needle):
    answer = good_answer()
    mutate(answer)
    fake.mode, fake.custom = "json", answer
    srv = server_factory("--upstream", fake.url)
    sid = srv.post("/sessions").json()["session_id"]
    resp = chat(srv, sid, MSG, stream=stream)
    assert resp.status_code == 502
    assert needle in resp.json()["error"]
    assert srv.get(f"/sessions/{sid}").json()["records"] == []


DEEP = b"[" * 300 + b"]" * 300  # orjson reads it, but writes at most 254 levels


def _deep_answer(where: str) -> bytes:
    answer = good_answer()
    if where == "replay":  # the client's copy must be written without routed_experts
        answer["choices"][0]["meta_info"]["routed_experts"] = [[1, 2]]
        answer["choices"][0]["x"] = "DEEP"
    elif where == "spaced":  # not compact: the stored copy must be written again
        answer["choices"][0]["x"] = "DEEP"
    else:  # inside the generated message, which the store writes again
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "DEEP"}}
        answer["choices"][0]["message"]["tool_calls"] = [call]
    raw = orjson.dumps(answer, option=orjson.OPT_INDENT_2 if where == "spaced" else 0)
    return raw.replace(b'"DEEP"', DEEP)


@pytest.mark.parametrize("where", ["replay", "spaced", "message"])
def test_an_answer_too_deep_to_write_again_is_502_and_unrecorded(server_factory, fake, where):
    fake.mode, fake.custom = "raw", _deep_answer(where)
    srv = server_factory("--upstream", fake.url)
    sid = srv.post("/sessions").json()["session_id"]
    resp = chat(srv, sid, MSG)
    assert resp.status_code == 502
    assert resp.json()["error"].startswith("malformed backend answer: the answer cannot be written")
    assert srv.get(f"/sessions/{sid}").json()["records"] == []
    fake.mode = "normal"  # the session goes on
    assert chat(srv, sid, MSG).status_code == 200


def test_an_answer_over_the_size_limit_is_502(server_factory, fake):
    fake.mode, fake.huge_bytes = "huge", 100_000
    srv = server_factory("--upstream", fake.url, "--max-upstream-answer-bytes", "100000")
    resp = chat(srv, "big", MSG)
    assert resp.status_code == 502
    assert resp.json()["error"] == "malformed backend answer: larger than 100000 bytes"
    assert srv.get("/sessions/big").json()["records"] == []
    fake.mode = "normal"
    assert chat(srv, "big", MSG).status_code == 200  # the pool recovered


# --- 9. smaller defects ---------------------------------------------------------------


def test_head_answers_wherever_get_does(server, raw_factory):
    sid = server.post("/sessions").json()["session_id"]
    raw = raw_factory(server.url)
    for path in ("/health", f"/sessions/{sid}", "/sessions/never-seen", "/metrics", "/docs"):
        raw.send(request("HEAD", path))
        status, headers, body = raw.response(head=True)
        assert status == 200, path
        assert body == b""
    raw.send(request("GET", "/health"))  # the connection is still in step
    assert raw.response()[0] == 200


def test_head_sends_the_length_get_sends_once_and_no_body(server):
    sid = server.post("/sessions").json()["session_id"]
    host, port = server.url.removeprefix("http://").split(":")
    for path in ("/openapi.json", "/health", f"/sessions/{sid}", "/sessions/p/v1/models"):
        length = len(server.get(path).content)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lengths = [
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        ]
        assert head.startswith(b"HTTP/1.1 200"), path
        assert lengths == [str(length).encode()], (path, lengths)
        assert body == b"", path


def test_two_host_headers_are_400(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    status, _, body = raw.response()
    assert status == 400
    assert json.loads(body) == {"error": "malformed HTTP request: more than one Host header"}


def test_http11_without_host_is_400(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(b"GET /health HTTP/1.1\r\n\r\n")
    status, _, body = raw.response()
    assert status == 400
    assert "Host" in json.loads(body)["error"]
    raw = raw_factory(server.url)
    raw.send(b"GET /health HTTP/1.0\r\n\r\n")
    assert raw.response()[0] == 200


def test_a_head_over_64_kib_is_400_and_the_connection_ends(server, raw_factory):
    raw = raw_factory(server.url)
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (k, b"a" * 1000) for k in range(70))
    raw.send(b"GET /health HTTP/1.1\r\nHost: t\r\n" + filler)  # never ends
    status, headers, body = raw.response()
    assert status == 400
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {
        "error": "malformed HTTP request: request head larger than 65536 bytes"
    }
    assert raw.closed_by_server()
    raw = raw_factory(server.url)  # a large head under the limit is served
    under = b"".join(b"X-Filler-%d: %s\r\n" % (k, b"a" * 1000) for k in range(55))
    raw.send(b"GET /health HTTP/1.1\r\nHost: t\r\n" + under + b"\r\n")
    assert raw.response()[0] == 200


def test_an_unparseable_request_is_a_json_400_and_the_connection_ends(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header Name: x\r\n\r\n")
    status, headers, body = raw.response()
    assert status == 400
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"].startswith("malformed HTTP request: ")
    assert raw.closed_by_server()


def test_a_transfer_coding_other_than_chunked_is_501(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(
        b"POST /sessions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    status, _, body = raw.response()
    assert status == 501
    assert json.loads(body)["error"].startswith("unsupported transfer-encoding: gzip, chunked")


def test_no_100_continue_for_http10(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(
        b"POST /sessions HTTP/1.0\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _, body = raw.response()
    assert status == 200 and b"session_id" in body
    assert not raw.buf
    raw11 = raw_factory(server.url)
    raw11.send(
        b"POST /sessions HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert raw11.response()[0] == 100
    raw11.send(b"{}")
    assert raw11.response()[0] == 200


def test_absolute_form_target_is_served(server, raw_factory):
    raw = raw_factory(server.url)
    raw.send(b"GET http://test/health HTTP/1.1\r\nHost: test\r\n\r\n")
    status, _, body = raw.response()
    assert status == 200 and json.loads(body)["status"] == "ok"


# --- API keys ---


def test_api_key_guards_every_route_but_health(server_factory, echo):
    srv = server_factory(
        "--upstream",
        echo.url,
        env={"ROLLOUT_SESSIONS_API_KEY": "s3cret", "ROLLOUT_SESSIONS_UPSTREAM_API_KEY": "up"},
    )
    assert srv.get("/health").status_code == 200
    for method, path in (
        ("POST", "/sessions"),
        ("GET", "/sessions/x"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/nowhere"),
        ("GET", "/sessions/x/v1/models"),
    ):
        for auth in (
            None,
            "Bearer wrong",
            "s3cret",
            "Bearer s3cre",
            "Basic s3cret",
            "Bearers3cret",
        ):
            headers = {"Authorization": auth} if auth else {}
            resp = srv.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, auth)
            assert resp.json() == {"error": "unauthorized"}
    good = {"Authorization": "Bearer s3cret"}
    assert srv.post("/sessions", headers=good).status_code == 200
    for scheme in ("bearer", "BEARER"):  # an auth scheme is case-insensitive (RFC 9110, 11.1)
        resp = srv.post("/sessions", headers={"Authorization": f"{scheme} s3cret"})
        assert resp.status_code == 200
    seen = srv.get("/sessions/x/v1/whoami", headers=good).json()
    auth = [v for k, v in seen["headers"] if k.lower() == "authorization"]
    assert auth == ["Bearer up"]  # ours never leaves; the upstream's key is sent


def test_openai_sdk_works_with_the_api_key(server_factory):
    import openai

    srv = server_factory(env={"ROLLOUT_SESSIONS_API_KEY": "k-123"})
    sid = "sdk-auth"
    client = openai.OpenAI(base_url=f"{srv.url}/sessions/{sid}/v1", api_key="k-123")
    answer = client.chat.completions.create(model="echo", messages=MSG)
    assert answer.choices[0].message.content == "echo: hello"
    wrong = openai.OpenAI(base_url=f"{srv.url}/sessions/{sid}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="echo", messages=MSG)


# --- no duplicated server / date headers on passthrough ---


def test_passthrough_answers_carry_one_server_and_date_header(srv, raw_factory):
    raw = raw_factory(srv.url)
    raw.send(request("GET", "/sessions/x/echo/status/418"))
    raw.sock.settimeout(5)
    while b"\r\n\r\n" not in raw.buf:
        raw._fill()
    head = raw.buf.split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"\r\nserver:") == 1
    assert head.count(b"\r\ndate:") == 1
