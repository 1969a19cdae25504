"""Abort on delete: how fast a DELETE closes the upstream connections of its turns.

A ``serve`` (defaults: ``CANCEL_ON_DELETE=on``, journal on unless
``--no-journal``) forwards to a recording backend (in this process, on its
own thread) that holds every chat request for ``--hold`` seconds and notes
the moment its client closes the connection. Each round chats ``--turns``
turns of one new session at once, waits until the backend holds all of
them, sends ``DELETE /sessions/{id}`` and waits until the backend has seen
every one of those connections closed and every turn answered (404).

Per round: ``all_closed_ms``, from sending the DELETE to the last of the
round's connections closing at the backend; per connection: ``close_ms``.
The backend and the load client share this process, so their GIL
contention counts against the server: the figures are upper bounds.

    .venv/bin/python benchmarks/bench_cancel.py
    .venv/bin/python benchmarks/bench_cancel.py --rounds 200 --turns 64 --no-journal

Target: every connection of a round closed within 100 ms of the DELETE, at p99 over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import RESULTS, finish, median  # noqa: E402

from rollout_sessions.testing.processes import start_server  # noqa: E402
from rollout_sessions.testing.recording_backend import (  # noqa: E402
    DELAY_HEADER,
    RecordingBackend,
)

TARGET_MS = 100.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def turn(http: aiohttp.ClientSession, url: str, sid: str, k: int, hold: float) -> int:
    body = {"messages": [{"role": "user", "content": f"turn {k} of {sid}"}], "max_tokens": 64}
    async with http.post(
        f"{url}/sessions/{sid}/v1/chat/completions", json=body, headers={DELAY_HEADER: str(hold)}
    ) as resp:
        await resp.read()
        return resp.status


async def wait_until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        await asyncio.sleep(0.001)


async def run(url: str, backend: RecordingBackend, args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    close_ms: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for r in range(args.warmup + args.rounds):
            sid = f"bench-cancel-{r}"
            backend.clear()
            turns = [
                asyncio.create_task(turn(http, url, sid, k, args.hold)) for k in range(args.turns)
            ]
            await wait_until(lambda: len(backend.seen) == args.turns, 30)
            sent = time.monotonic()
            async with http.delete(f"{url}/sessions/{sid}") as resp:
                assert resp.status == 204, resp.status
            deleted = time.monotonic()
            await wait_until(lambda: len(backend.gone) == args.turns, args.hold / 2)
            statuses = await asyncio.gather(*turns)
            answered = time.monotonic()
            if r < args.warmup:
                continue
            closes = [(g.at - sent) * 1e3 for g in backend.gone]
            close_ms += closes
            rounds.append(
                {
                    "delete_ms": (deleted - sent) * 1e3,
                    "all_closed_ms": max(closes),
                    "all_answered_ms": (answered - sent) * 1e3,
                    "statuses": sorted(set(statuses)),
                    "backend_answered": backend.answered,
                }
            )
    all_closed = [r["all_closed_ms"] for r in rounds]
    return {
        "rounds": rounds,
        "summary": {
            "all_closed_ms_p50": median(all_closed),
            "all_closed_ms_p99": percentile(all_closed, 0.99),
            "all_closed_ms_max": max(all_closed),
            "close_ms_p50": median(close_ms),
            "close_ms_p99": percentile(close_ms, 0.99),
            "delete_ms_p50": median([r["delete_ms"] for r in rounds]),
            "delete_ms_p99": percentile([r["delete_ms"] for r in rounds], 0.99),
            "all_answered_ms_p99": percentile([r["all_answered_ms"] for r in rounds], 0.99),
            "turns_not_404": sum(r["statuses"] != [404] for r in rounds),
            "turns_answered_by_backend": sum(r["backend_answered"] for r in rounds),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turns", type=int, default=64, help="turns in flight per DELETE")
    p.add_argument("--hold", type=float, default=20.0, help="seconds the backend holds a turn")
    p.add_argument("--no-journal", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "cancel.json"))
    args = p.parse_args(argv)

    flags = ["--no-journal"] if args.no_journal else []
    with RecordingBackend() as backend, tempfile.TemporaryDirectory() as data:
        srv = start_server("--upstream", backend.url, "--data-dir", data, *flags)
        try:
            res = asyncio.run(run(srv.url, backend, args))
        finally:
            srv.cleanup()
    s = res["summary"]
    print(
        f"{args.rounds} DELETEs, {args.turns} turns in flight each: every connection closed "
        f"within p50 {s['all_closed_ms_p50']:.1f} ms, p99 {s['all_closed_ms_p99']:.1f} ms, "
        f"max {s['all_closed_ms_max']:.1f} ms; per connection p99 {s['close_ms_p99']:.1f} ms; "
        f"DELETE answered p99 {s['delete_ms_p99']:.1f} ms; turns not 404: {s['turns_not_404']}"
    )
    res["config"] = {
        "rounds": args.rounds,
        "turns": args.turns,
        "hold_s": args.hold,
        "journal": not args.no_journal,
        "command": "benchmarks/bench_cancel.py " + " ".join(argv or sys.argv[1:]),
    }
    targets = [
        {
            "target": f"all {args.turns} upstream connections closed after DELETE, p99 <= "
            f"{TARGET_MS:.0f} ms",
            "value": s["all_closed_ms_p99"],
            "met": s["all_closed_ms_p99"] <= TARGET_MS
            and s["turns_not_404"] == 0
            and s["turns_answered_by_backend"] == 0,
        }
    ]
    finish(res, targets, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
