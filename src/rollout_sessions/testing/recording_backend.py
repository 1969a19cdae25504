"""A chat backend that records what it was sent and notices a client that goes away.

For the rollout-controls tests and ``benchmarks/bench_cancel.py``. It runs
on its own thread and event loop, on raw sockets (one request at a time per
connection, as aiohttp's pool sends them). Every request is kept as a
``Seen`` (method, target, lower-cased headers, body, arrival time). A chat
answer is SGLang-shaped and extends the echo template's token ids, so the
session server records it like a real backend's.

A request is answered after ``delay_s`` seconds, or after the number of
seconds in its ``x-test-delay`` header (the session server forwards the
client's headers). While it waits, the backend watches its connection: a
client that closes it is noted in ``gone`` (``Gone``: the request, and when
the close arrived), as SGLang and vLLM notice it and abort the generation;
that request is never answered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from rollout_sessions.echo.template import completion_tokens, prompt_tokens

DELAY_HEADER = "x-test-delay"


@dataclass(slots=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request was complete

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class Gone:
    request: Seen
    at: float  # time.monotonic() when the client's close arrived


class RecordingBackend:
    """``with RecordingBackend() as backend:`` serves on ``backend.url``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.seen: list[Seen] = []
        self.gone: list[Gone] = []
        self.answered = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="recording-backend")
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingBackend:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the recording backend did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def clear(self) -> None:
        self.seen.clear()
        self.gone.clear()
        self.answered = 0

    def chat_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.target.startswith("/v1/chat/completions")]

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
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, target, headers, body, time.monotonic())
                self.seen.append(seen)
                delay = float(headers.get(DELAY_HEADER, self.delay_s))
                if delay > 0:
                    try:
                        # Bytes before the answer can only be the client's close
                        # (b""): no client sends a second request before its answer.
                        data = await asyncio.wait_for(reader.read(1), delay)
                    except TimeoutError:
                        data = None
                    if data is not None:
                        self.gone.append(Gone(seen, time.monotonic()))
                        return
                writer.write(_answer(seen))
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _answer(seen: Seen) -> bytes:
    if not seen.target.startswith("/v1/chat/completions"):
        body = orjson.dumps({"method": seen.method, "target": seen.target})
    else:
        body = orjson.dumps(chat_answer(orjson.loads(seen.body)))
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: application/json"
    return head.encode() + b"\r\n\r\n" + body


def chat_answer(
    request: dict[str, Any], answer_id: str = "recorded", model: str = "recording"
) -> dict[str, Any]:
    """An SGLang-style answer on the echo template, naming the last message."""
    messages = request.get("messages") or []
    last = messages[-1].get("content") if messages else ""
    message = {"role": "assistant", "content": f"answer to {last}"}
    prompt = request.get("input_ids") or prompt_tokens(messages)
    completion = completion_tokens(message)
    return {
        "id": answer_id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "stop",
                "prompt_token_ids": prompt,
                "meta_info": {
                    "output_token_logprobs": [[-0.5, t, None] for t in completion],
                    "completion_tokens": len(completion),
                },
            }
        ],
    }
