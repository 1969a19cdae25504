"""Lifecycle throughput: our server against the FastAPI reference, one run.

Each simulated client repeats create (POST /sessions), read (GET
/sessions/{id}) and delete (DELETE /sessions/{id}) over its own keep-alive
connection; many clients run concurrently from a separate load-generator
process over loopback. Both servers are started here (or targeted with
``--ours-url`` / ``--reference-url``) and measured in alternating rounds so
they share the machine's noise; the median round of each is reported.

    .venv/bin/python benchmarks/bench_lifecycle.py            # defaults below
    .venv/bin/python benchmarks/bench_lifecycle.py --concurrency 64,256 \
        --duration 10 --rounds 3 --json benchmarks/results/lifecycle.json

``--live-sessions N`` first creates N sessions in each server (minted, kept
live for the whole run, untimed), so the lifecycle load runs next to a large
live population, as a server in the middle of a rollout does; the GET p99 is
then reported separately as well.

``ours`` is ``serve`` as it ships (journal on: every create and delete is
committed before it is answered); ``ours_nojournal`` is ``--no-journal``.

Targets: lifecycle throughput >= 3x the reference's, p99 latency <= 1/3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import (  # noqa: E402
    RESULTS,
    alternating_rounds,
    finish,
    median,
    ours_argv,
    reference_argv,
    started,
)


async def _fill(url: str, n: int, clients: int = 32) -> None:
    from httpload import HttpClient, create_session

    left = [n]

    async def client() -> None:
        http = HttpClient.for_url(url, timeout=60.0)
        try:
            while left[0] > 0:
                left[0] -= 1
                status, _ = await create_session(http)
                if status != 200:
                    raise RuntimeError(f"filling {url}: POST /sessions answered {status}")
        finally:
            await http.close()

    await asyncio.gather(*(client() for _ in range(clients)))


def fill(url: str, n: int) -> None:
    """Create ``n`` live sessions in the server at ``url`` (untimed)."""
    t0 = time.perf_counter()
    asyncio.run(_fill(url, n))
    print(f"filled {url} with {n:,} live sessions in {time.perf_counter() - t0:.1f}s")


def measure(urls: dict[str, str], concurrency: int, a: argparse.Namespace) -> dict[str, Any]:
    runs = alternating_rounds(
        urls,
        a.rounds,
        lambda name, url: [
            "lifecycle",
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(a.duration),
            "--warmup",
            str(a.warmup),
        ],
    )
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {
            "sessions_per_s": median([x["units_per_s"] for x in rs]),
            "requests_per_s": median([x["requests_per_s"] for x in rs]),
            "p50_ms": median([x["latency_ms"]["all"]["p50"] for x in rs]),
            "p99_ms": median([x["latency_ms"]["all"]["p99"] for x in rs]),
            "get_p99_ms": median([x["latency_ms"]["get"]["p99"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
            "rounds": rs,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="64,256", help="comma list of client counts")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    p.add_argument(
        "--live-sessions", type=int, default=0, help="sessions created first and kept live"
    )
    p.add_argument("--servers", default="ours,ours_nojournal,reference")
    p.add_argument("--ours-url", help="use a running server instead of starting one")
    p.add_argument("--reference-url", help="use a running reference instead of starting one")
    p.add_argument("--json", type=Path, default=RESULTS / "lifecycle.json")
    a = p.parse_args(argv)
    names = a.servers.split(",")
    levels = [int(x) for x in a.concurrency.split(",")]

    res: dict[str, Any] = {"params": {k: str(v) for k, v in vars(a).items()}, "levels": {}}
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        if "ours" in names:
            urls["ours"] = stack.enter_context(started("ours", ours_argv(), a.ours_url))
        if "ours_nojournal" in names:  # memory only: each create and delete unjournaled
            urls["ours_nojournal"] = stack.enter_context(
                started("ours_nojournal", ours_argv(None, "--no-journal"), None)
            )
        if "reference" in names:
            urls["reference"] = stack.enter_context(
                started("reference", lambda port: reference_argv(port), a.reference_url)
            )
        if a.live_sessions:
            for url in urls.values():
                fill(url, a.live_sessions)
        for c in levels:
            res["levels"][str(c)] = measure(urls, c, a)

    live = f", {a.live_sessions:,} other sessions live" if a.live_sessions else ""
    print(
        f"\n== lifecycle (create+get+delete), median of {a.rounds} rounds of {a.duration}s{live} =="
    )
    print(
        f"{'clients':>7} {'server':14} {'sessions/s':>11} {'req/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'GET p99':>8} {'errors':>6}"
    )
    targets = []
    for c, d in res["levels"].items():
        for name, m in d.items():
            print(
                f"{c:>7} {name:14} {m['sessions_per_s']:>11,.0f} {m['requests_per_s']:>9,.0f} "
                f"{m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} {m['get_p99_ms']:>8.3f} {m['errors']:>6}"
            )
        for ours in ("ours", "ours_nojournal"):
            if {ours, "reference"} <= d.keys():
                tput = d[ours]["sessions_per_s"] / d["reference"]["sessions_per_s"]
                p99 = d[ours]["p99_ms"] / d["reference"]["p99_ms"]
                targets += [
                    {
                        "target": f"c={c} throughput {ours}/ref >= 3",
                        "value": tput,
                        "met": tput >= 3,
                    },
                    {"target": f"c={c} p99 {ours}/ref <= 1/3", "value": p99, "met": p99 <= 1 / 3},
                    {
                        "target": f"c={c} no errors ({ours})",
                        "value": d[ours]["errors"],
                        "met": d[ours]["errors"] == 0,
                    },
                ]
    finish(res, targets, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
