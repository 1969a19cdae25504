"""Memory per idle session, all in: server RSS growth over HTTP.

Starts ``rollout-sessions serve`` (embedded echo backend), warms it up,
then creates N sessions with ``POST /sessions`` from concurrent keep-alive
clients in this process and reads the server's resident memory before and
after. Idle means created and never chatted. Target: <= 300 bytes at 1M.

    python benchmarks/bench_memory.py --sessions 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpload import HttpClient, create_session  # noqa: E402

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


async def create_many(url: str, n: int, concurrency: int) -> int:
    clients = [HttpClient.for_url(url) for _ in range(concurrency)]
    failures = 0

    async def worker(client: HttpClient, count: int) -> None:
        nonlocal failures
        for _ in range(count):
            status, _ = await create_session(client)
            failures += status != 200

    share, extra = divmod(n, concurrency)
    await asyncio.gather(*(worker(c, share + (i < extra)) for i, c in enumerate(clients)))
    for c in clients:
        await c.close()
    return failures


def settle_rss(proc: psutil.Process) -> int:
    """Resident memory of the server and any children (it runs in one process)."""
    time.sleep(1.0)  # let the server finish any in-flight bookkeeping
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ManagedProcess(serve_argv(port, "--log-level", "warning"), port) as server:
        server.wait_healthy()
        proc = psutil.Process(server.pid)
        uvloop.run(create_many(url, 20_000, args.concurrency))
        before = settle_rss(proc)
        t0 = time.perf_counter()
        failures = uvloop.run(create_many(url, args.sessions, args.concurrency))
        elapsed = time.perf_counter() - t0
        after = settle_rss(proc)
    per = (after - before) / args.sessions
    result = {
        "sessions": args.sessions,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_idle_session": per,
        "failures": failures,
        "creates_per_s": args.sessions / elapsed,
        "target_bytes": 300,
        "met": per <= 300 and failures == 0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"{args.sessions:,} idle sessions: {per:.0f} bytes each (RSS {before / 2**20:.0f} -> "
        f"{after / 2**20:.0f} MiB), {failures} failures, {result['creates_per_s']:,.0f} creates/s; "
        f"target <= 300: {'met' if result['met'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
