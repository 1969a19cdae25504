"""``rollout-sessions cluster``: N instances behind a real HAProxy, over real HTTP.

Every id is checked against the Python model of the routing rule
(``balancer.route``) by asking every instance directly which one holds it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rollout_sessions import demo
from rollout_sessions.cluster.balancer import BUFFER_BYTES, route
from rollout_sessions.testing.processes import ManagedProcess, clean_env, free_port_range

# Each test starts HAProxy and N serve instances.
pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:-"
CHAT = "/v1/chat/completions"
TURN = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class ClusterProc(ManagedProcess):
    """A running ``rollout-sessions cluster``: the balancer URL and each instance's."""

    def __init__(self, n: int, *flags: str) -> None:
        port = free_port_range(n + 1)  # the balancer, then the instances
        argv = [sys.executable, "-m", "rollout_sessions", "cluster", "--instances", str(n)]
        argv += ["--port", str(port), "--base-port", str(port + 1), *flags]
        super().__init__(argv, port)
        self.n = n
        self.http = requests.Session()
        self.instance_urls = [f"http://{HOST}:{port + 1 + k}" for k in range(n)]
        self.state_path = Path(self.argv_cwd) / "rollout-sessions-cluster" / "cluster.json"
        deadline = time.monotonic() + 90
        while not self.state_path.exists():
            if not self.alive() or time.monotonic() > deadline:
                self.cleanup()
                raise RuntimeError(f"cluster did not start:\n{self.log()}")
            time.sleep(0.1)

    @property
    def argv_cwd(self) -> str:
        assert self._own_dir is not None
        return self._own_dir

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.http.request(method, self.url + path, **kw)

    def holders(self, sid: str) -> list[int]:
        """The instances that hold ``sid``, asked directly (a never-seen id
        answers 200 with empty ``metadata``, a deleted one 404)."""
        # Dots encoded too: a client removes a "." or ".." path segment.
        quoted = urllib.parse.quote(sid, safe="").replace(".", "%2E")
        found = []
        for k, url in enumerate(self.instance_urls):
            r = requests.get(f"{url}/sessions/{quoted}", timeout=10)
            assert r.status_code in (200, 404), (k, sid, r.status_code)
            if r.status_code == 200 and r.json()["metadata"]:
                found.append(k)
        return found

    def cleanup(self) -> None:
        self.http.close()
        super().cleanup()


@pytest.fixture(scope="module", params=[2, 3], ids=["N2", "N3"])
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterProc]:
    proc = ClusterProc(request.param)
    yield proc
    proc.cleanup()


def _encode(sid: str, rnd: random.Random) -> str:
    """Percent-encode a random subset of the id's characters (mixed hex case)."""
    out = []
    for ch in sid:
        if rnd.random() < 0.3:
            code = f"%{ord(ch):02X}"
            out.append(code.lower() if rnd.random() < 0.5 else code)
        else:
            out.append(ch)
    return "".join(out)


# "." and ".." are invalid ids (a client removes them from a path): 400 below.
ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128).filter(
    lambda sid: sid not in (".", "..")
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(by_id="...", auto=".a", seed=1152400)  # dots, but no dot segment
@given(by_id=ids, auto=ids, seed=st.integers(0, 2**32))
def test_every_id_lives_on_the_instance_the_model_says(
    cluster: ClusterProc, by_id: str, auto: str, seed: int
) -> None:
    rnd = random.Random(seed)
    tags = list(range(cluster.n))
    created = cluster.request("POST", "/sessions", json={"session_id": by_id})
    assert created.status_code in (200, 409), created.text  # 409: an earlier example's
    assert cluster.holders(by_id) == [route(by_id, tags)]
    chat = cluster.request("POST", f"/sessions/{_encode(auto, rnd)}{CHAT}", json=TURN)
    assert chat.status_code == 200, chat.text
    assert cluster.holders(auto) == [route(auto, tags)]
    minted = cluster.request("POST", "/sessions").json()["session_id"]
    assert cluster.holders(minted) == [route(minted, tags)] == [int(minted[:3], 16)]
    turn = cluster.request("POST", f"/sessions/{_encode(minted, rnd)}{CHAT}", json=TURN)
    assert turn.status_code == 200, turn.text
    records = cluster.request("GET", f"/sessions/{minted}").json()["records"]
    assert len(records) == 1


@pytest.mark.parametrize("sid", [".", ".."])
def test_dot_segment_ids_are_400_through_the_balancer(cluster: ClusterProc, sid: str) -> None:
    expected = {
        "error": f"invalid session id: {sid!r} is a dot segment, which HTTP clients remove "
        "from paths"
    }
    created = cluster.request("POST", "/sessions", json={"session_id": sid})
    assert (created.status_code, created.json()) == (400, expected)
    encoded = "%2E" * len(sid)  # a bare dot segment never leaves the client
    chat = cluster.request("POST", f"/sessions/{encoded}{CHAT}", json=TURN)
    assert (chat.status_code, chat.json()) == (400, expected)
    for url in cluster.instance_urls:  # and no instance holds it
        assert requests.get(f"{url}/sessions/{encoded}", timeout=10).json() == expected


def test_mints_spread_over_every_instance(cluster: ClusterProc) -> None:
    prefixes = {cluster.request("POST", "/sessions").json()["session_id"][:3] for _ in range(12)}
    assert prefixes == {f"{k:03x}" for k in range(cluster.n)}


def test_create_by_id_body_and_path_agree(cluster: ClusterProc) -> None:
    for k in range(40):
        sid = f"agree-{k}"
        body = '{"note": "session_id",\n  "session_id" : "' + sid + '", "n": {"a": 1}}'
        r = cluster.request(
            "POST", "/sessions", data=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text
        assert cluster.request("GET", f"/sessions/{sid}").status_code == 200
        assert cluster.holders(sid) == [route(sid, list(range(cluster.n)))]


def test_a_create_body_is_read_up_to_one_balancer_buffer(cluster: ClusterProc) -> None:
    # Metadata beside the id: 40 KB is read and routed (it was a 413 with
    # HAProxy's default 16 KiB buffer), past one buffer it is refused.
    for size, status in ((40_000, 200), (BUFFER_BYTES + 1, 413)):
        sid = f"padded-{size}"
        body = json.dumps({"note": "x" * size, "session_id": sid})
        r = cluster.request(
            "POST", "/sessions", data=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == status, r.text
        holders = [route(sid, list(range(cluster.n)))] if status == 200 else []
        assert cluster.holders(sid) == holders


def test_ambiguous_create_bodies_are_refused(cluster: ClusterProc) -> None:
    duplicate = '{"session_id": "dup-a", "session_id": "dup-b"}'
    escaped = '{"session_\\u0069d": "esc-a"}'
    for body in (duplicate, escaped):
        r = cluster.request("POST", "/sessions", data=body)
        assert r.status_code == 400 and "ambiguous" in r.json()["error"]
    for sid in ("dup-a", "dup-b", "esc-a"):
        assert cluster.holders(sid) == []


def test_invalid_ids_get_the_servers_own_answer(cluster: ClusterProc) -> None:
    direct = requests.post(f"{cluster.instance_urls[0]}/sessions/a%2Fb{CHAT}", json=TURN)
    via = cluster.request("POST", f"/sessions/a%2Fb{CHAT}", json=TURN)
    assert via.status_code == direct.status_code == 400
    assert via.json() == direct.json()
    too_long = "x" * 129
    assert cluster.request("POST", "/sessions", json={"session_id": too_long}).status_code == 400


def test_delete_sticks_through_the_balancer(cluster: ClusterProc) -> None:
    minted = cluster.request("POST", "/sessions").json()["session_id"]
    for sid in (minted, "sticky-by-id"):
        if sid != minted:
            assert cluster.request("POST", "/sessions", json={"session_id": sid}).ok
        assert cluster.request("POST", f"/sessions/{sid}{CHAT}", json=TURN).status_code == 200
        assert cluster.request("DELETE", f"/sessions/{sid}").status_code == 204
        assert cluster.request("POST", f"/sessions/{sid}{CHAT}", json=TURN).status_code == 404
        assert cluster.request("GET", f"/sessions/{sid}").status_code == 404
        assert cluster.request("DELETE", f"/sessions/{sid}").status_code == 404
        again = cluster.request("POST", "/sessions", json={"session_id": sid})
        assert again.status_code == 404
        assert cluster.holders(sid) == []


def test_demo_through_the_balancer_has_no_resurrection(
    cluster: ClusterProc, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", cluster.url, "--sessions", "150", "--concurrency", "16", "--turns", "2"]
    rc = demo.main([*argv, "--no-progress", "--json"])
    tally = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert tally["sessions"] == 150 and tally["errors"] == 0
    assert tally["retries_refused"] == tally["retries"] > 0
    assert tally["resurrections"] == 0


def test_instance_paths_reach_each_instance(cluster: ClusterProc) -> None:
    seen = set()
    for k in range(cluster.n):
        via = cluster.request("GET", f"/instances/{k}/health").json()
        direct = requests.get(f"{cluster.instance_urls[k]}/health", timeout=10).json()
        assert via["session_server_instance_id"] == direct["session_server_instance_id"]
        seen.add(via["session_server_instance_id"])
        metrics = cluster.request("GET", f"/instances/{k}/metrics")
        assert metrics.status_code == 200 and "rollout_sessions" in metrics.text
    assert len(seen) == cluster.n
    assert cluster.request("GET", f"/instances/{cluster.n}/health").status_code == 404
    assert "haproxy_process" in cluster.request("GET", "/balancer/metrics").text


def test_body_over_the_limit_is_refused_by_the_balancer(cluster: ClusterProc) -> None:
    limit = 64 * 1024 * 1024
    with socket.create_connection((HOST, cluster.port), timeout=10) as sock:
        sock.sendall(
            f"POST /sessions/big{CHAT} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert f"request body exceeds {limit} bytes" in head


# --- failures and shutdown (a cluster of their own) ------------------------------------


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_dead_instance_is_not_served_elsewhere_and_comes_back() -> None:
    cluster = ClusterProc(2)
    try:
        tags = [0, 1]
        mine = [cluster.request("POST", "/sessions").json()["session_id"] for _ in range(4)]
        mine = [sid for sid in mine if sid.startswith("001")]
        hashed = next(f"h{k}" for k in range(100) if route(f"h{k}", tags) == 1)
        assert cluster.request("POST", "/sessions", json={"session_id": hashed}).ok
        for sid in [*mine, hashed]:
            assert cluster.request("POST", f"/sessions/{sid}{CHAT}", json=TURN).ok
        victim = cluster.state()["instances"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        # Its ids: 502/503 only, never created or served on instance 0. (New
        # connections: a keep-alive one caught in the crash may instead be
        # closed without an answer, HAProxy's way to make a client retry.)
        fresh = next(f"n{k}" for k in range(100) if route(f"n{k}", tags) == 1)
        for _ in range(3):
            for sid in [*mine, hashed]:
                assert requests.get(f"{cluster.url}/sessions/{sid}").status_code in (502, 503)
            r = requests.post(f"{cluster.url}/sessions/{fresh}{CHAT}", json=TURN)
            assert r.status_code in (502, 503)
            r = requests.post(f"{cluster.url}/sessions", json={"session_id": fresh})
            assert r.status_code in (502, 503) and "error" in r.json()
        assert requests.get(f"{cluster.instance_urls[0]}/sessions/{fresh}").json()["metadata"] == {}
        # Mints go to the live instance meanwhile.
        assert cluster.request("POST", "/sessions").json()["session_id"].startswith("000")
        # Restarted with the same tag, port and data dir: the journal brings its sessions back.
        _wait(lambda: cluster.state()["instances"][1]["restarts"] == 1, 30, "the restart")
        _wait(
            lambda: cluster.request("GET", f"/sessions/{hashed}").status_code == 200, 30, "serving"
        )
        assert cluster.state()["instances"][1]["pid"] != victim
        for sid in [*mine, hashed]:
            r = cluster.request("GET", f"/sessions/{sid}")
            assert r.status_code == 200 and len(r.json()["records"]) == 1
            assert cluster.holders(sid) == [1]
    finally:
        cluster.cleanup()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_sigterm_leaves_no_process_and_no_listener() -> None:
    cluster = ClusterProc(2)
    try:
        state = cluster.state()
        pids = [state["balancer"]["pid"], *(i["pid"] for i in state["instances"])]
        assert cluster.request("POST", "/sessions").ok
        try:
            status = cluster.stop(signal.SIGTERM, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the cluster did not stop within 60 s:\n{cluster.log()}")
        assert status == 0, cluster.log()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
        ports = [cluster.port, *(cluster.port + 1 + k for k in range(2))]
        assert not any(_listening(p) for p in ports)
        assert "stopped" in cluster.log()
    finally:
        cluster.cleanup()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


# --- start-up errors and cluster-config -------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "rollout_sessions", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(env), timeout=60)


def test_cluster_without_haproxy_says_how_to_install_it(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    result = _run("cluster", "--instances", "2", "--port", "18999", env={"PATH": str(bare)})
    assert result.returncode == 2
    assert "haproxy not found on PATH" in result.stderr
    assert "apt-get install haproxy" in result.stderr


def test_cluster_config_checks_and_is_accepted_by_haproxy(tmp_path: Path) -> None:
    result = _run(
        "cluster-config",
        "--instance",
        "7@10.0.0.1:8001",
        "--instance",
        "10.0.0.2:8001",
        "--port",
        "8000",
        "--max-body-bytes",
        "1048576",
    )
    assert result.returncode == 0, result.stderr
    config = tmp_path / "haproxy.cfg"
    config.write_text(result.stdout)
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "server i0 10.0.0.1:8001" in result.stdout
    assert "-m beg 007" in result.stdout and "-m beg 001" in result.stdout
    assert "gt 1048576" in result.stdout
    duplicate = _run("cluster-config", "--instance", "1@a:1", "--instance", "b:2")
    assert duplicate.returncode == 2 and "unique" in duplicate.stderr
