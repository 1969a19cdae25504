"""Chat-turn overhead and throughput: our server against the FastAPI reference.

One echo backend (``rollout-sessions echo-backend``) serves three targets in
the same run, each driven by the load generator in its own process over
loopback:

- ``direct``: the backend's own ``/v1/chat/completions`` (the baseline);
- ``ours``: ``POST /sessions/{id}/v1/chat/completions`` on our server;
- ``reference``: the same route on the FastAPI reference (httpx, stdlib json),
  configured as production's session server is (httpx default pool limits);
- ``reference_httpx2``: the same reference with pydantic's ``httpx2`` fork,
  whose connection pool does not rescan every connection per request (httpx
  issue 3215). Not production; it shows how much of the gap is the client
  library, so the comparison is not won against a starved baseline.

At each concurrency (concurrent sessions, one keep-alive client each), every
client runs conversations of ``--turns-per-session`` turns (the history grows
each turn, sessions are created and deleted around them, untimed). The added
latency is the server's p50/p99 minus the direct p50/p99 of the same round;
rounds alternate the order of the targets and the median round is reported.

    .venv/bin/python benchmarks/bench_chat.py
    .venv/bin/python benchmarks/bench_chat.py --concurrency 1,64,1024 --duration 8 \
        --rounds 3 --json benchmarks/results/chat.json

Targets: added p50 <= 0.5 ms with 1 session; turns/s >= 3x the reference at
64 and 1024 sessions, and no errors.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import (  # noqa: E402
    RESULTS,
    alternating_rounds,
    echo_argv,
    finish,
    median,
    ours_argv,
    reference_argv,
    started,
)


def measure(urls: dict[str, str], c: int, a: argparse.Namespace) -> dict[str, Any]:
    warmup = a.warmup if c < 256 else max(a.warmup, 2.0)  # 1024 connections to open first

    def loadgen_args(name: str, url: str) -> list[str]:
        args = ["chat", "--url", url, "--concurrency", str(c)]
        args += ["--duration", str(a.duration), "--warmup", str(warmup)]
        args += ["--turns-per-session", str(a.turns_per_session)]
        return [*args, "--direct"] if name == "direct" else args

    runs = alternating_rounds(urls, a.rounds, loadgen_args)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        lat = [x["latency_ms"].get("turn", {}) for x in rs]
        out[name] = {
            "turns_per_s": median([x["units_per_s"] for x in rs]),
            "p50_ms": median([x.get("p50", float("nan")) for x in lat]),
            "p99_ms": median([x.get("p99", float("nan")) for x in lat]),
            "errors": sum(x["errors"] for x in rs),
            "error_samples": [s for x in rs for s in x["error_samples"]][:5],
            "rounds": rs,
        }
    if "direct" in runs:
        for name, rs in runs.items():
            if name == "direct":
                continue
            # Same-round differences, then the median: both saw the same noise.
            d50 = [
                x["latency_ms"]["turn"]["p50"] - y["latency_ms"]["turn"]["p50"]
                for x, y in zip(rs, runs["direct"], strict=True)
                if "turn" in x["latency_ms"] and "turn" in y["latency_ms"]
            ]
            d99 = [
                x["latency_ms"]["turn"]["p99"] - y["latency_ms"]["turn"]["p99"]
                for x, y in zip(rs, runs["direct"], strict=True)
                if "turn" in x["latency_ms"] and "turn" in y["latency_ms"]
            ]
            out[name]["added_p50_ms"] = median(d50) if d50 else float("nan")
            out[name]["added_p99_ms"] = median(d99) if d99 else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,64,1024", help="comma list of concurrent sessions")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns-per-session", type=int, default=8)
    p.add_argument("--targets", default="direct,ours,reference,reference_httpx2")
    p.add_argument("--echo-latency-ms", type=float, default=0.0)
    p.add_argument("--echo-url", help="use a running echo backend instead of starting one")
    p.add_argument("--ours-url", help="use a running server (its upstream must be the echo)")
    p.add_argument("--reference-url", help="use a running reference (upstream: the echo)")
    p.add_argument("--json", type=Path, default=RESULTS / "chat.json")
    a = p.parse_args(argv)
    names = a.targets.split(",")
    levels = [int(x) for x in a.concurrency.split(",")]

    res: dict[str, Any] = {"params": {k: str(v) for k, v in vars(a).items()}, "levels": {}}
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(
            started("echo", lambda port: echo_argv(port, a.echo_latency_ms), a.echo_url)
        )
        urls: dict[str, str] = {}
        if "direct" in names:
            urls["direct"] = echo
        if "ours" in names:
            urls["ours"] = stack.enter_context(started("ours", ours_argv(echo), a.ours_url))
        if "reference" in names:
            urls["reference"] = stack.enter_context(
                started("reference", lambda port: reference_argv(port, echo), a.reference_url)
            )
        if "reference_httpx2" in names:
            urls["reference_httpx2"] = stack.enter_context(
                started(
                    "reference_httpx2",
                    lambda port: reference_argv(port, echo, "--client", "httpx2"),
                )
            )
        for c in levels:
            res["levels"][str(c)] = measure(urls, c, a)

    print(f"\n== chat turns, median of {a.rounds} rounds of {a.duration}s ==")
    print(
        f"{'sessions':>8} {'target':16} {'turns/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'errors':>6}"
    )
    targets = []
    for c, d in res["levels"].items():
        for name, m in d.items():
            add50 = f"{m['added_p50_ms']:8.3f}" if "added_p50_ms" in m else " " * 8
            add99 = f"{m['added_p99_ms']:8.3f}" if "added_p99_ms" in m else " " * 8
            print(
                f"{c:>8} {name:16} {m['turns_per_s']:>9,.0f} {m['p50_ms']:>8.3f} "
                f"{m['p99_ms']:>8.3f} {add50} {add99} {m['errors']:>6}"
            )
            for sample in m["error_samples"][:2]:
                print(f"{'':>8} ! {sample[:150]}")
        if c == "1" and "ours" in d and "added_p50_ms" in d["ours"]:
            v = d["ours"]["added_p50_ms"]
            targets.append({"target": "c=1 added p50 ms <= 0.5", "value": v, "met": v <= 0.5})
        for ref in ("reference", "reference_httpx2"):
            if int(c) >= 64 and {"ours", ref} <= d.keys():
                # A reference so slow that every client is still in its warm-up
                # turn when the window closes records no turn (0 turns/s).
                ref_rate = d[ref]["turns_per_s"]
                r = d["ours"]["turns_per_s"] / ref_rate if ref_rate else float("inf")
                targets.append(
                    {"target": f"c={c} turns/s ours/{ref} >= 3", "value": r, "met": r >= 3}
                )
        if "ours" in d:
            e = d["ours"]["errors"]
            targets.append({"target": f"c={c} ours errors == 0", "value": e, "met": e == 0})
    finish(res, targets, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
