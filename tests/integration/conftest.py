"""Fixtures for the subprocess tests: real servers and echo backends on free ports.

- ``server_factory(*flags, env=None, port=None, wait=True)`` starts
  ``rollout-sessions serve`` and waits for ``/health``; every server it
  started is stopped at teardown.
- ``server``: one module-scoped server with default settings (embedded echo).
- ``echo_factory(latency_ms=0.0)`` starts ``rollout-sessions echo-backend``;
  ``echo`` is a module-scoped one and ``srv`` a server forwarding to it.
- ``raw_factory(url)``: a hand-spoken HTTP/1.1 connection (``rawhttp.Raw``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from rawhttp import Raw

from rollout_sessions.testing.processes import ManagedProcess, start_echo, start_server

HOST = "127.0.0.1"

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


class ServerProc(ManagedProcess):
    """A running ``rollout-sessions serve`` with a keep-alive ``requests`` client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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

    def cleanup(self) -> None:
        self.http.close()
        super().cleanup()


def serve(*flags: str, **kw: Any) -> ServerProc:
    return start_server(*flags, cls=ServerProc, **kw)  # type: ignore[return-value]


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProc]]:
    started: list[ServerProc] = []

    def factory(*flags: str, **kw: Any) -> ServerProc:
        srv = serve(*flags, **kw)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.cleanup()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    srv = serve()
    yield srv
    srv.cleanup()


@pytest.fixture
def echo_factory() -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def factory(latency_ms: float = 0.0) -> ManagedProcess:
        echo = start_echo(latency_ms)
        started.append(echo)
        return echo

    yield factory
    for echo in started:
        echo.cleanup()


@pytest.fixture(scope="module")
def echo() -> Iterator[ManagedProcess]:
    """An echo backend subprocess for the module; tests may inspect what it saw."""
    proc = start_echo()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def srv(echo: ManagedProcess) -> Iterator[ServerProc]:
    """A server forwarding to the module's echo backend."""
    proc = serve("--upstream", echo.url)
    yield proc
    proc.cleanup()


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
