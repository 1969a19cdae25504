"""The session API as a client sees it, over one pooled ``aiohttp`` session.

Used by the demo, the soak and the benchmarks. Only loopback targets are
accepted for load (``check_loopback``).
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from rollout_sessions.routes.turn import FORCED_FLAGS
from rollout_sessions.web.routing import CHAT_PATH


class SessionClient:
    """``create`` / ``get`` / ``delete`` / ``chat`` against one server URL."""

    def __init__(self, url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request; ``(status, body)``. Transport failures raise ``aiohttp.ClientError``."""
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self._session.request(
            method, self.url + path, data=body, headers=headers
        ) as resp:
            return resp.status, await resp.read()

    async def create(self, session_id: str | None = None) -> tuple[int, str]:
        """``POST /sessions`` (minted, or under ``session_id``): ``(status, id)``."""
        body = None if session_id is None else orjson.dumps({"session_id": session_id})
        status, data = await self.request("POST", "/sessions", body)
        if status == 200:
            return status, json.loads(data)["session_id"]
        return status, session_id or ""

    async def get(self, session_id: str) -> tuple[int, bytes]:
        return await self.request("GET", f"/sessions/{session_id}")

    async def delete(self, session_id: str) -> int:
        status, _ = await self.request("DELETE", f"/sessions/{session_id}")
        return status

    async def chat(
        self, session_id: str | None, messages: list[dict[str, Any]], **fields: Any
    ) -> tuple[int, bytes]:
        """A chat turn through ``session_id`` (``None``: the backend directly, with
        the flags the session server would force)."""
        req: dict[str, Any] = {"model": "echo", "messages": messages, **fields}
        if session_id is None:
            req.update(FORCED_FLAGS)
        return await self.request("POST", chat_path(session_id), orjson.dumps(req))


def chat_path(session_id: str | None) -> str:
    """The chat route through a session, or the backend's own (``None``)."""
    return CHAT_PATH if session_id is None else f"/sessions/{session_id}{CHAT_PATH}"


def check_loopback(url: str) -> None:
    """``ValueError`` unless ``url`` is an http:// URL on this machine."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, None)
    except OSError as exc:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {exc}") from None
    for info in infos:
        addr = str(info[4][0])
        if not (addr.startswith("127.") or addr == "::1"):
            raise ValueError(f"refusing to send load to non-loopback address {addr} ({url})")


def first_messages(n: int) -> list[dict[str, Any]]:
    """The opening of conversation ``n`` (distinct per session)."""
    return [
        {"role": "system", "content": "You are a rollout agent."},
        {"role": "user", "content": f"Solve task {n}."},
    ]


def next_messages(
    messages: list[dict[str, Any]], response: bytes, turn: int
) -> list[dict[str, Any]]:
    """The agent's next request: history + the assistant answer + a tool result."""
    assistant = json.loads(response)["choices"][0]["message"]
    tool: dict[str, Any] = {"role": "tool", "content": f"observation {turn}"}
    calls = assistant.get("tool_calls")
    if calls:
        tool["tool_call_id"] = calls[0].get("id", "call-0")
    return [*messages, assistant, tool]
