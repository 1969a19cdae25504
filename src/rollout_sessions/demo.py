"""``rollout-sessions demo``: a simulated rollout that shows delete sticks.

It starts a server with the embedded echo backend in a subprocess (or
targets ``--url``), then drives ``--sessions`` conversations with
``--concurrency`` clients: each session is created (minted by the server,
created under a client-chosen id, or auto-created by its first chat, in
turn), given ``--turns`` chat turns, read back, and deleted, as a rollout
harness does. After each delete the stale retries an agent sends in
practice are fired at the deleted id (a chat turn and a GET). Every retry
must be refused with 404; a retry answered 200 is a *resurrection*. The
summary table counts them, and the exit status is non-zero if there is any
resurrection or any other unexpected answer.

This module also holds the small HTTP/1.1 driver that the benchmarks' load
generator shares (``benchmarks/loadgen.py``): one keep-alive connection per
simulated client over raw asyncio streams (cheap enough that the client
does not become the bottleneck on a small machine), the lifecycle and chat
calls, the conversation bookkeeping, and starting a server subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# --- HTTP/1.1 over one keep-alive connection ----------------------------------


class HttpError(Exception):
    """The connection failed or the answer was not valid HTTP/1.1."""


def _parse_response(buf: bytearray, method: str) -> tuple[int, int, bytes, bool] | None:
    """One complete response at the start of ``buf``: (consumed, status, body, close).

    ``None`` while incomplete. Handles Content-Length, chunked and 204/304.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = -1
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    start = end + 4
    if method == "HEAD" or status in (204, 304) or status < 200:
        return start, status, b"", close
    if chunked:
        pos, body = start, []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                fin = buf.find(b"\r\n", eol + 2)  # no trailers expected
                if fin < 0:
                    return None
                return fin + 2, status, b"".join(body), close
            if len(buf) < eol + 2 + size + 2:
                return None
            body.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2
    if length < 0:
        raise ValueError("response without Content-Length or chunked framing")
    if len(buf) < start + length:
        return None
    return start + length, status, bytes(buf[start : start + length]), close


class _Conn(asyncio.Protocol):
    """The socket side of ``HttpClient``: buffers bytes, completes one waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.method = "GET"
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            done = _parse_response(self.buf, self.method)
        except ValueError as e:
            waiter.set_exception(HttpError(f"malformed response: {e}"))
            return
        if done is not None:
            consumed, status, body, close = done
            del self.buf[:consumed]
            waiter.set_result((status, body, close))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by peer'}"))


class HttpClient:
    """One keep-alive HTTP/1.1 connection; requests on it run one at a time.

    A plain ``asyncio.Protocol`` rather than streams: per request it costs a
    write and one future, so a load generator spends its CPU on requests,
    not on itself. Reconnects lazily after a failure or a ``Connection:
    close``. Callers keep it on loopback (``check_loopback``).
    """

    __slots__ = ("host", "port", "timeout", "_conn", "_host_header")

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._conn: _Conn | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    @classmethod
    def for_url(cls, url: str, timeout: float = 60.0) -> HttpClient:
        host, port = split_url(url)
        return cls(host, port, timeout)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request; return (status, body). Raises HttpError on failure."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.lost:
            try:
                _, conn = await loop.create_connection(_Conn, self.host, self.port)
            except OSError as e:
                raise HttpError(f"{method} {path}: cannot connect: {e}") from e
            sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), path.encode()) + self._host_header
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        waiter = conn.waiter = loop.create_future()
        conn.method = method
        conn.transport.write(head + b"\r\n" + body if body else head + b"\r\n")  # type: ignore[union-attr]
        timer = loop.call_later(self.timeout, waiter.cancel)
        try:
            status, data, close = await waiter
        except asyncio.CancelledError:
            await self.close()
            if timer.when() <= loop.time():  # our timer fired, not an outside cancel
                raise HttpError(f"{method} {path}: timed out after {self.timeout}s") from None
            raise
        except HttpError as e:
            await self.close()
            raise HttpError(f"{method} {path}: {e}") from e
        finally:
            timer.cancel()
            conn.waiter = None
        if close:
            await self.close()
        return status, data


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    return parts.hostname, parts.port or 80


def check_loopback(url: str) -> None:
    """Load is only ever aimed at this machine."""
    host, _ = split_url(url)
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from None
    for info in infos:
        addr = info[4][0]
        if not (addr.startswith("127.") or addr == "::1"):
            raise ValueError(f"refusing to send load to non-loopback address {addr} ({url})")


# --- the session API as a client sees it --------------------------------------


async def create_session(client: HttpClient, session_id: str | None = None) -> tuple[int, str]:
    """POST /sessions (minted, or under ``session_id``); returns (status, id)."""
    body = None if session_id is None else json.dumps({"session_id": session_id}).encode()
    status, data = await client.request("POST", "/sessions", body)
    if status == 200:
        return status, json.loads(data)["session_id"]
    return status, session_id or ""


async def get_session(client: HttpClient, session_id: str) -> tuple[int, bytes]:
    return await client.request("GET", f"/sessions/{session_id}")


async def delete_session(client: HttpClient, session_id: str) -> int:
    status, _ = await client.request("DELETE", f"/sessions/{session_id}")
    return status


def chat_path(session_id: str | None) -> str:
    """The chat route through a session, or the backend's own (``None``)."""
    if session_id is None:
        return "/v1/chat/completions"
    return f"/sessions/{session_id}/v1/chat/completions"


# What the session server forces on every turn; a direct call to the backend
# asks for the same, so both make the backend do the same work.
FORCED_FLAGS = {
    "logprobs": True,
    "return_prompt_token_ids": True,
    "return_meta_info": True,
    "no_stop_trim": False,
}


async def chat_turn(
    client: HttpClient, session_id: str | None, messages: list[dict[str, Any]]
) -> tuple[int, bytes]:
    """One chat turn through session ``session_id`` (``None``: the backend directly)."""
    req: dict[str, Any] = {"model": "echo", "messages": messages, "max_tokens": 16}
    if session_id is None:
        req.update(FORCED_FLAGS)
    return await client.request("POST", chat_path(session_id), json.dumps(req).encode())


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
    choice = json.loads(response)["choices"][0]
    assistant = choice["message"]
    tool: dict[str, Any] = {"role": "tool", "content": f"observation {turn}"}
    calls = assistant.get("tool_calls")
    if calls:
        tool["tool_call_id"] = calls[0].get("id", "call-0")
    return [*messages, assistant, tool]


# --- running a server subprocess ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(
    url: str,
    timeout: float = 30.0,
    proc: subprocess.Popen | None = None,
    path: str | None = "/health",
) -> None:
    """Wait until ``GET url+path`` answers 200 (``path=None``: until it accepts TCP)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was healthy")
        if path is None:
            try:
                with socket.create_connection(split_url(url), timeout=1.0):
                    return
            except OSError as e:
                last = str(e)
        else:
            client = HttpClient.for_url(url, timeout=2.0)
            try:
                status, _ = await client.request("GET", path)
                if status == 200:
                    return
                last = f"status {status}"
            except HttpError as e:
                last = str(e)
            finally:
                await client.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"server at {url} not healthy after {timeout}s ({last})")


@contextlib.contextmanager
def server_process(
    argv: Sequence[str],
    url: str,
    env: dict[str, str] | None = None,
    log: Any = None,
    health_path: str | None = "/health",
) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait until ``url`` is healthy, stop it (SIGTERM, then kill) on exit."""
    proc = subprocess.Popen(
        list(argv),
        env={**os.environ, **(env or {})},
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
    )
    try:
        asyncio.run(wait_healthy(url, proc=proc, path=health_path))
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_argv(port: int, upstream: str | None = None, *extra: str) -> list[str]:
    """Our server, as ``rollout-sessions serve`` runs it."""
    argv = [sys.executable, "-m", "rollout_sessions.cli", "serve", "--port", str(port)]
    argv += ["--log-level", "warning"]
    if upstream:
        argv += ["--upstream", upstream]
    return argv + list(extra)


# --- percentiles ----------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# --- the demo rollout -------------------------------------------------------------

KINDS = ("minted", "by_id", "auto")


@dataclass
class Tally:
    sessions: int = 0
    turns: int = 0
    deletes: int = 0
    retries: int = 0
    retries_refused: int = 0
    resurrections: int = 0
    errors: int = 0
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


def _kind(n: int, mode: str) -> str:
    return KINDS[n % 3] if mode == "mixed" else mode


async def _one_session(
    client: HttpClient, n: int, turns: int, retries: int, mode: str, tally: Tally, prefix: str
) -> None:
    kind = _kind(n, mode)
    sid: str | None
    if kind == "minted":
        status, sid = await create_session(client)
    elif kind == "by_id":
        status, sid = await create_session(client, f"{prefix}-{n}")
    else:
        status, sid = 200, f"{prefix}-auto-{n}"  # the first chat creates it
    tally.requests += kind != "auto"
    if status != 200:
        tally.error(f"create {kind} {sid}: {status}")
        return
    messages = first_messages(n)
    for t in range(turns):
        status, data = await chat_turn(client, sid, messages)
        tally.requests += 1
        if status != 200:
            tally.error(f"chat {sid} turn {t}: {status} {data[:200]!r}")
            return
        tally.turns += 1
        messages = next_messages(messages, data, t)
    status, data = await get_session(client, sid)
    tally.requests += 1
    if status != 200:
        tally.error(f"get {sid}: {status}")
        return
    records = len(json.loads(data).get("records", []))
    if records != turns:
        tally.error(f"get {sid}: {records} records after {turns} turns")
    status = await delete_session(client, sid)
    tally.requests += 1
    if status != 204:
        tally.error(f"delete {sid}: {status}")
        return
    tally.deletes += 1
    tally.sessions += 1
    tally.by_kind[kind] += 1
    # The stale retries an agent sends after the harness already deleted.
    for _ in range(retries):
        for label in ("chat", "get"):
            if label == "chat":
                status, data = await chat_turn(client, sid, messages)
            else:
                status, data = await get_session(client, sid)
            tally.requests += 1
            tally.retries += 1
            if status == 404:
                tally.retries_refused += 1
            elif status == 200:
                tally.resurrections += 1
                tally.error(f"resurrection: stale {label} of deleted {sid} answered 200")
            else:
                tally.error(f"stale {label} {sid}: {status} {data[:200]!r}")


async def run_rollout(
    url: str,
    sessions: int,
    concurrency: int,
    turns: int,
    retries: int = 1,
    mode: str = "mixed",
    on_session: Callable[[], None] | None = None,
) -> tuple[Tally, float]:
    """Drive the rollout; returns the tally and the elapsed seconds."""
    tally = Tally()
    prefix = f"demo-{os.getpid()}-{int(time.time() * 1000):x}"
    counter = iter(range(sessions))

    async def worker() -> None:
        client = HttpClient.for_url(url)
        try:
            for n in counter:
                try:
                    await _one_session(client, n, turns, retries, mode, tally, prefix)
                except HttpError as e:
                    tally.error(str(e))
                if on_session is not None:
                    on_session()
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, sessions)))))
    return tally, time.perf_counter() - t0


def summary_rows(tally: Tally, elapsed: float) -> list[tuple[str, str]]:
    kinds = ", ".join(f"{k} {v:,}" for k, v in tally.by_kind.items())
    return [
        ("sessions", f"{tally.sessions:,}  ({kinds})"),
        ("turns", f"{tally.turns:,}"),
        ("deletes", f"{tally.deletes:,}"),
        ("stale retries sent", f"{tally.retries:,}"),
        ("retries refused (404)", f"{tally.retries_refused:,}"),
        ("resurrections", f"{tally.resurrections:,}"),
        ("other errors", f"{tally.errors - tally.resurrections:,}"),
        ("elapsed", f"{elapsed:.2f} s"),
        (
            "throughput",
            f"{tally.sessions / elapsed:,.0f} sessions/s, "
            f"{tally.turns / elapsed:,.0f} turns/s, "
            f"{tally.requests / elapsed:,.0f} requests/s",
        ),
    ]


def print_summary(tally: Tally, elapsed: float, out: Any = None) -> None:
    out = out or sys.stdout
    rows = summary_rows(tally, elapsed)
    width = max(len(k) for k, _ in rows)
    print("", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
    for sample in tally.error_samples:
        print(f"  ! {sample}", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rollout-sessions demo",
        description="Simulated rollout: create, chat, delete every session, then stale retries "
        "at the deleted ids; prints a summary and fails on any resurrection.",
    )
    p.add_argument(
        "--url",
        help="target a running server (loopback only); default: start one "
        "with the embedded echo backend",
    )
    p.add_argument("--sessions", type=int, default=10_000, help="sessions to run (default 10000)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--turns", type=int, default=2, help="chat turns per session (default 2)")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="stale retry rounds (chat + GET) per deleted session (default 1)",
    )
    p.add_argument(
        "--ids",
        choices=["mixed", *KINDS],
        default="mixed",
        help="how sessions come to exist: minted by the server, created by id, "
        "auto-created by the first chat, or a mix of the three (default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the tally as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sessions < 1 or args.concurrency < 1 or args.turns < 0 or args.retries < 0:
        print(
            "demo: --sessions and --concurrency must be >= 1, --turns and --retries >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass

    def run(url: str) -> tuple[Tally, float]:
        from tqdm import tqdm

        with tqdm(
            total=args.sessions,
            unit="session",
            disable=args.no_progress,
            file=sys.stderr,
            desc="rollout",
        ) as bar:
            return asyncio.run(
                run_rollout(
                    url,
                    args.sessions,
                    args.concurrency,
                    args.turns,
                    args.retries,
                    args.ids,
                    on_session=lambda: bar.update(1),
                )
            )

    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
        target = args.url.rstrip("/")
        print(f"demo: target {target}", file=sys.stderr)
        tally, elapsed = run(target)
    else:
        port = free_port()
        target = f"http://127.0.0.1:{port}"
        print(
            f"demo: starting a server with the embedded echo backend on {target}", file=sys.stderr
        )
        with server_process(serve_argv(port), target):
            tally, elapsed = run(target)
    print_summary(tally, elapsed)
    if args.json:
        print(json.dumps({"elapsed_s": elapsed, **tally.__dict__}))
    if tally.resurrections:
        print(f"demo: FAIL: {tally.resurrections} resurrection(s)", file=sys.stderr)
        return 1
    if tally.errors:
        print(f"demo: FAIL: {tally.errors} unexpected answer(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
