"""A backend that misbehaves on command, written on raw sockets so it can do
what no well-behaved HTTP server does (answer twice, answer nobody).

It runs on its own thread and event loop. Chat answers are SGLang-shaped
and extend each other like the echo backend's (same toy template), and
their content names the last message, so a test can tell whose answer it is.

``mode`` (settable any time) is one of:

- ``"normal"``;
- ``"extra_same_write"``: every answer is followed, in the same write, by a
  second answer nobody asked for;
- ``"extra_late"``: 0.2 s after every answer, an answer nobody asked for
  arrives on the idle connection;
- ``"redirect"``: ``302`` to ``/elsewhere`` (which answers 200 and counts
  its visits);
- ``"json"``: the chat answer is ``custom`` (a dict) as given;
- ``"raw"``: the chat answer is ``custom`` (bytes) as given;
- ``"huge"``: a 200 answer declared (and sent) larger than ``huge_bytes``;
- ``"interim"``: before the normal answer, one interim answer per status in
  ``interim`` (e.g. ``[103]``), each in its own write, 50 ms apart, so each
  arrives in its own TCP segment.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson

from rollout_sessions.testing.recording_backend import chat_answer as recorded_answer


class FakeUpstream:
    def __init__(self) -> None:
        self.mode = "normal"
        self.custom: Any = None  # a dict ("json") or bytes ("raw")
        self.huge_bytes = 0
        self.interim: list[int] = []
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.elsewhere_visits = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, headers, body))
                await self._answer(writer, target, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, target: str, body: bytes) -> None:
        if target.startswith("/elsewhere"):
            self.elsewhere_visits += 1
            writer.write(_response(200, b'{"elsewhere": true}'))
            return
        mode = self.mode
        if mode == "redirect":
            writer.write(_response(302, b"", [("Location", f"{self.url}/elsewhere")]))
            return
        if mode == "huge":
            writer.write(_response(200, b" " * (self.huge_bytes + 1)))
            return
        if mode == "json":
            writer.write(_response(200, orjson.dumps(self.custom)))
            return
        if mode == "raw":  # bytes as given (orjson cannot write everything a backend can)
            writer.write(_response(200, self.custom))
            return
        if mode == "interim":
            for status in self.interim:
                writer.write(_interim(status))
                await writer.drain()
                await asyncio.sleep(0.05)
        request = orjson.loads(body) if body else {}
        answer = _response(200, orjson.dumps(chat_answer(request)))
        stray = _response(200, orjson.dumps(chat_answer({"messages": [{"content": "STRAY"}]})))
        if mode == "extra_same_write":
            writer.write(answer + stray)
        else:
            writer.write(answer)
            if mode == "extra_late":
                self._loop.call_later(0.2, writer.write, stray)
        await writer.drain()


def chat_answer(request: dict[str, Any]) -> dict[str, Any]:
    """An SGLang-style answer whose content names the request's last message."""
    return recorded_answer(request, answer_id="fake", model="fake")


def _response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += ["Content-Type: application/json"] if body else []
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _interim(status: int) -> bytes:
    """An interim (1xx) answer head; 103 carries a header as Early Hints do."""
    extra = "Link: </style.css>; rel=preload\r\n" if status == 103 else ""
    return f"HTTP/1.1 {status} Interim\r\n{extra}\r\n".encode()
