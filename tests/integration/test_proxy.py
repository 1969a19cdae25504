"""The generic proxy ``* /sessions/{id}/{path}`` over real HTTP."""

from __future__ import annotations

import http.client
import uuid

import pytest
import requests
from conftest import ServerProc

from rollout_sessions.routes.forward import safe_subpath
from rollout_sessions.testing.processes import free_port


def raw_request(srv: ServerProc, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send the request target byte for byte (no client-side path normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_models_forwarded(srv: ServerProc):
    resp = requests.get(f"{srv.url}/sessions/{uuid.uuid4().hex}/v1/models", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["data"][0]["id"] == "echo"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_method_query_body_headers_forwarded(srv: ServerProc, method: str):
    sid = uuid.uuid4().hex
    body = b'{"k": "v"}' if method != "GET" else b""
    resp = requests.request(
        method,
        f"{srv.url}/sessions/{sid}/v1/some/thing",
        params={"a": "1", "b": "x y"},
        data=body,
        headers={
            "X-Custom": "kept",
            "Authorization": "Bearer t0k",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped: named by Connection",
            "Keep-Alive": "timeout=5",
        },
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert seen["method"] == method
    assert seen["path"] == "/v1/some/thing"
    assert seen["query"] == "a=1&b=x+y"
    assert seen["body"] == body.decode()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-custom"] == "kept"
    assert headers["authorization"] == "Bearer t0k"
    assert "x-hop" not in headers and "keep-alive" not in headers
    if body:
        assert headers["content-length"] == str(len(body))  # recomputed, not copied
    # No session state was touched: the id is still never seen.
    assert requests.get(f"{srv.url}/sessions/{sid}", timeout=10).json()["metadata"] == {}


def test_upstream_status_passes_through(srv: ServerProc):
    resp = requests.get(f"{srv.url}/sessions/x/echo/status/418", timeout=10)
    assert resp.status_code == 418
    assert resp.json()["path"] == "/echo/status/418"


@pytest.mark.parametrize(
    "target",
    [
        "/sessions/x/../../etc/passwd",
        "/sessions/x/v1/../../admin",
        "/sessions/x/%2e%2e/admin",
        "/sessions/x/v1/%2E%2E/%2e%2e/admin",
        "/sessions/x/.%2e/admin",
        "/sessions/x/%252e%252e/admin",
        "/sessions/x//evil.example/path",
        "/sessions/x/v1//models",
        "/sessions/x/%2F%2Fevil.example/path",
        "/sessions/x/http://evil.example/",
        "/sessions/x/http:%2F%2Fevil.example/",
        "/sessions/x/v1/..%5c..%5cadmin",
        "/sessions/x/v1/%5c%5cevil",
    ],
)
def test_path_escapes_refused(srv: ServerProc, target: str):
    status, body = raw_request(srv, "GET", target)
    assert status == 400, (target, body)
    assert b'"error"' in body


def test_safe_subpath_unit():
    assert safe_subpath("v1/models") == "v1/models"
    assert safe_subpath("v1/a%20b/c") == "v1/a%20b/c"
    assert safe_subpath("v1/..x/y") == "v1/..x/y"  # a name, not a dot segment
    assert safe_subpath("v1/a:b") == "v1/a:b"
    for bad in (
        "../x",
        "a/../b",
        "%2e%2e",
        "a/%2E%2e/b",
        "%25252e%25252e",
        "/abs",
        "a//b",
        "x:y/z",
    ):
        assert safe_subpath(bad) is None, bad


def test_proxy_upstream_down_502(server_factory):
    down = server_factory("--upstream", f"http://127.0.0.1:{free_port()}")
    resp = requests.get(f"{down.url}/sessions/x/v1/models", timeout=10)
    assert resp.status_code == 502
    assert resp.json()["error"].startswith("backend transport error: ")
