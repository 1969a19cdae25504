"""Shared fixtures: real server and echo-backend subprocesses on free ports.

- ``server_factory(*flags, env=None, port=None, wait=True)`` starts
  ``python -m rollout_sessions.cli serve --port P *flags`` and waits for
  ``/health``; every server it started is stopped at teardown.
- ``server``: one module-scoped server with default settings (embedded echo
  backend).
- ``echo_factory(latency_ms=0.0)`` starts ``rollout-sessions echo-backend``;
  ``echo_backend`` is a module-scoped one without latency.
- ``Raw`` and ``request``: one TCP connection speaking HTTP/1.1 by hand.

Environment variables ``ROLLOUT_SESSIONS_*`` of the outer environment are
never inherited: only what a test passes in ``env`` reaches the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLOUT_SESSIONS_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class Proc:
    """A subprocess whose combined output goes to a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int) -> None:
        self.cmd = cmd
        self.port = port
        self.url = f"http://{HOST}:{port}"
        fd, name = tempfile.mkstemp(prefix="rollout-sessions-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            # Own process group: a kill after a failed graceful stop must not
            # orphan anything the process started.
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal and wait; kill after ``timeout``. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                raise
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL this process and everything it started (its own group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10.0)
        if self.proc.poll() is not None:
            # It is gone; make sure nothing it started lingers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class ServerProc(Proc):
    """A running ``rollout-sessions serve`` with a keep-alive HTTP client."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int) -> None:
        super().__init__(cmd, env, port)
        self.http = requests.Session()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.http.request(method, self.url + path, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up:\n{self.log()}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def cleanup(self) -> None:
        self.http.close()
        super().cleanup()


def start_server(
    *flags: str, env: dict[str, str] | None = None, port: int | None = None, wait: bool = True
) -> ServerProc:
    """Start a server; ``--port`` is added unless ``port`` says where it will listen."""
    args = list(flags)
    if port is None:
        port = free_port()
        args = ["--port", str(port), *args]
    cmd = [sys.executable, "-m", "rollout_sessions.cli", "serve", *args]
    srv = ServerProc(cmd, clean_env(env), port)
    if wait:
        try:
            srv.wait_healthy()
        except Exception:
            srv.cleanup()
            raise
    return srv


class EchoProc(Proc):
    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"echo backend exited during start-up:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"echo backend not ready after {timeout}s:\n{self.log()}")


def start_echo(latency_ms: float = 0.0) -> EchoProc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "rollout_sessions.cli",
        "echo-backend",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
    ]
    echo = EchoProc(cmd, clean_env(), port)
    try:
        echo.wait_ready()
    except Exception:
        echo.cleanup()
        raise
    return echo


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProc]]:
    started: list[ServerProc] = []

    def factory(*flags: str, **kw: Any) -> ServerProc:
        srv = start_server(*flags, **kw)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.cleanup()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    srv = start_server()
    yield srv
    srv.cleanup()


@pytest.fixture
def echo_factory() -> Iterator[Callable[..., EchoProc]]:
    started: list[EchoProc] = []

    def factory(latency_ms: float = 0.0) -> EchoProc:
        echo = start_echo(latency_ms)
        started.append(echo)
        return echo

    yield factory
    for echo in started:
        echo.cleanup()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoProc]:
    """An echo backend subprocess for the module; tests may inspect what it saw."""
    proc = start_echo()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def srv(echo: EchoProc) -> Iterator[ServerProc]:
    """A server forwarding to the module's echo backend."""
    proc = start_server("--upstream", echo.url)
    yield proc
    proc.cleanup()


# A tool the echo backend can be asked to call (its `tool_rounds` control).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


class Raw:
    """One TCP connection speaking HTTP/1.1 by hand."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next answer: (status, headers, body); the body is framed by content-length."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before an answer; got {self.buf!r}")
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        length = 0 if head else int(headers.get(b"content-length", b"0"))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (nothing more to read)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, body: bytes | None = None, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


@pytest.fixture
def raw_factory() -> Iterator[Callable[[str], Raw]]:
    """``raw_factory(url)``: a hand-spoken HTTP/1.1 connection, closed at teardown."""
    made: list[Raw] = []

    def factory(url: str) -> Raw:
        made.append(Raw(url))
        return made[-1]

    yield factory
    for conn in made:
        conn.close()
