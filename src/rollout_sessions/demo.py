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

``--protocol anthropic`` speaks Anthropic Messages instead
(``POST /sessions/{id}/v1/messages``): each session is a tool-using agent
that gets a ``tool_use`` on every turn but the last, answers it with a
``tool_result``, and ends on a text answer (``end_turn``); its stale retry
is a Messages turn too.

Clients and server processes come from ``rollout_sessions.testing``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from rollout_sessions.testing.client import (
    SessionClient,
    check_loopback,
    first_messages,
    next_messages,
)
from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv

KINDS = ("minted", "by_id", "auto")
PROTOCOLS = ("chat", "anthropic")
MESSAGES_PATH = "/sessions/{}/v1/messages"
ANTHROPIC_TOOLS = [
    {
        "name": "lookup",
        "description": "look something up",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]


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
    tool_calls: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


def _kind(n: int, mode: str) -> str:
    return KINDS[n % 3] if mode == "mixed" else mode


def _anthropic_body(messages: list[dict[str, Any]], turns: int) -> bytes:
    return orjson.dumps(
        {
            "model": "echo",
            "max_tokens": 64,
            "system": "You are a rollout agent.",
            "messages": messages,
            "tools": ANTHROPIC_TOOLS,
            # The echo backend calls the tool on every turn but the last.
            "echo": {"tool_rounds": turns - 1},
        }
    )


def _anthropic_next(
    messages: list[dict[str, Any]], data: bytes, turn: int, turns: int
) -> tuple[list[dict[str, Any]], str | None]:
    """The agent's next messages after an Anthropic answer (the answer's blocks,
    then a tool_result per tool_use), and what was wrong with the answer."""
    answer = orjson.loads(data)
    content = answer["content"]
    uses = [block for block in content if block["type"] == "tool_use"]
    expected = "tool_use" if turn < turns - 1 else "end_turn"
    wrong = None
    if answer["stop_reason"] != expected or bool(uses) != (expected == "tool_use"):
        wrong = f"turn {turn}: stop_reason {answer['stop_reason']}, expected {expected}"
    results = [
        {"type": "tool_result", "tool_use_id": use["id"], "content": f"observation {turn}"}
        for use in uses
    ]
    after = [{"role": "assistant", "content": content}]
    if results:
        after.append({"role": "user", "content": results})
    return [*messages, *after], wrong


async def _turn(
    client: SessionClient, sid: str, protocol: str, messages: list[dict[str, Any]], turns: int
) -> tuple[int, bytes]:
    if protocol == "anthropic":
        body = _anthropic_body(messages, turns)
        return await client.request("POST", MESSAGES_PATH.format(sid), body)
    return await client.chat(sid, messages, max_tokens=16)


async def _one_session(
    client: SessionClient,
    n: int,
    turns: int,
    retries: int,
    mode: str,
    tally: Tally,
    prefix: str,
    protocol: str = "chat",
) -> None:
    kind = _kind(n, mode)
    sid: str | None
    if kind == "minted":
        status, sid = await client.create()
    elif kind == "by_id":
        status, sid = await client.create(f"{prefix}-{n}")
    else:
        status, sid = 200, f"{prefix}-auto-{n}"  # the first chat creates it
    tally.requests += kind != "auto"
    if status != 200:
        tally.error(f"create {kind} {sid}: {status}")
        return
    messages = first_messages(n)
    if protocol == "anthropic":  # the system prompt is a field of its own
        messages = messages[1:]
    sent = messages
    for t in range(turns):
        sent = messages
        status, data = await _turn(client, sid, protocol, messages, turns)
        tally.requests += 1
        if status != 200:
            tally.error(f"{protocol} {sid} turn {t}: {status} {data[:200]!r}")
            return
        tally.turns += 1
        if protocol == "anthropic":
            messages, wrong = _anthropic_next(messages, data, t, turns)
            tally.tool_calls += t < turns - 1 and wrong is None
            if wrong is not None:
                tally.error(f"anthropic {sid} {wrong}")
                return
        else:
            messages = next_messages(messages, data, t)
    status, data = await client.get(sid)
    tally.requests += 1
    if status != 200:
        tally.error(f"get {sid}: {status}")
        return
    records = len(json.loads(data).get("records", []))
    if records != turns:
        tally.error(f"get {sid}: {records} records after {turns} turns")
    status = await client.delete(sid)
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
                status, data = await _turn(client, sid, protocol, sent, turns)
            else:
                status, data = await client.get(sid)
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
    protocol: str = "chat",
) -> tuple[Tally, float]:
    """Drive the rollout; returns the tally and the elapsed seconds."""
    tally = Tally()
    prefix = f"demo-{os.getpid()}-{int(time.time() * 1000):x}"
    counter = iter(range(sessions))

    async def worker(client: SessionClient) -> None:
        for n in counter:
            try:
                await _one_session(client, n, turns, retries, mode, tally, prefix, protocol)
            except (aiohttp.ClientError, TimeoutError) as e:
                tally.error(f"{type(e).__name__}: {e}")
            if on_session is not None:
                on_session()

    t0 = time.perf_counter()
    async with SessionClient(url) as client:
        workers = max(1, min(concurrency, sessions))
        await asyncio.gather(*(worker(client) for _ in range(workers)))
    return tally, time.perf_counter() - t0


def summary_rows(tally: Tally, elapsed: float) -> list[tuple[str, str]]:
    kinds = ", ".join(f"{k} {v:,}" for k, v in tally.by_kind.items())
    return [
        ("sessions", f"{tally.sessions:,}  ({kinds})"),
        ("turns", f"{tally.turns:,}"),
        ("tool calls answered", f"{tally.tool_calls:,}"),
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
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="chat",
        help="chat: OpenAI chat completions (default); anthropic: Anthropic Messages "
        "(/v1/messages), a tool call on every turn but the last",
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
                    protocol=args.protocol,
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
        with ManagedProcess(serve_argv(port), port) as server:
            server.wait_healthy()
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
