"""``free_port``: the embedded echo backend's port is never the server's own.

uvicorn binds the server's port only after the app has started, and the echo
backend binds while it starts; a kernel that offered the echo backend the
server's port (still unbound then) made the server fail to bind after its
``/health`` had been answered by the echo backend.
"""

from __future__ import annotations

import socket
from typing import Any

from rollout_sessions.web import server


class OfferedPorts:
    """``socket.socket`` whose ``bind(0)`` gives the ports of ``offers`` in turn."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = offers

    def __call__(self, *args: Any) -> Any:
        offers = self.offers

        class Sock:
            def __enter__(self) -> Sock:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def bind(self, address: tuple[str, int]) -> None:
                assert address[1] == 0

            def getsockname(self) -> tuple[str, int]:
                return ("127.0.0.1", offers.pop(0))

        return Sock()


def test_a_port_the_kernel_offers_that_is_excluded_is_passed_over(monkeypatch) -> None:
    monkeypatch.setattr(server.socket, "socket", OfferedPorts([41000, 41000, 41001]))
    assert server.free_port(exclude=41000) == 41001


def test_without_exclude_the_first_offer_is_taken(monkeypatch) -> None:
    monkeypatch.setattr(server.socket, "socket", OfferedPorts([41000, 41001]))
    assert server.free_port() == 41000


def test_a_real_free_port_can_be_bound() -> None:
    port = server.free_port(exclude=8000)
    assert port != 8000
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
