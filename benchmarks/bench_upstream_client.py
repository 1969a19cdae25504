"""Upstream client choice: aiohttp against the chat pool (``proxy._ChatPool``), one run.

Both clients post the same chat body (a conversation four assistant turns
in, with the flags the session server forces) to one echo backend
(``rollout-sessions echo-backend``, its own process) and read the whole
answer. Both are built by ``proxy.Upstream`` exactly as the server builds
them, so the pool settings cannot drift from production:

- ``aiohttp``: the ``aiohttp.ClientSession`` of ``Upstream`` (keep-alive
  ``TCPConnector``, limit ``POOL_LIMIT``, 75 s keep-alive, total timeout),
  called as ``Upstream.send`` calls it for a chat turn (``decompress=True``);
- ``chatpool``: ``Upstream``'s ``_ChatPool`` (httptools, one write per
  request, LIFO keep-alive reuse), called as ``Upstream.chat`` calls it.

At each concurrency, ``C`` coroutines in this process (on uvloop) send
requests back to back for ``--duration`` seconds after ``--warmup``; every
request is timed with ``perf_counter_ns``. Rounds alternate the order of the
two clients and the median round is reported. "client CPU" is this
process's CPU time (user + system) over the measured window divided by the
requests completed in it: what the client costs the session server's event
loop per upstream call.

    .venv/bin/python benchmarks/bench_upstream_client.py
    .venv/bin/python benchmarks/bench_upstream_client.py --concurrency 1,64 \
        --duration 5 --rounds 5 --json benchmarks/results/upstream_client.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import RESULTS, echo_argv, median, started, write_json  # noqa: E402

from rollout_sessions.config import load_settings  # noqa: E402
from rollout_sessions.demo import FORCED_FLAGS, check_loopback, percentile  # noqa: E402
from rollout_sessions.proxy import Upstream  # noqa: E402

CLIENTS = ("aiohttp", "chatpool")


def chat_body(turns: int = 4) -> bytes:
    """A mid-rollout chat request: prompt, then ``turns`` assistant/tool steps."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a rollout agent. Use the tools to solve the task."},
        {"role": "user", "content": "Solve task 42: find the answer and report it."},
    ]
    for t in range(turns):
        messages.append({"role": "assistant", "content": f"echo: step {t} of the plan"})
        messages.append({"role": "tool", "content": f"observation {t}: nothing unusual"})
    req = {"model": "echo", "messages": messages, "max_tokens": 16, **FORCED_FLAGS}
    return orjson.dumps(req)


def make_senders(upstream: Upstream, body: bytes) -> dict[str, Any]:
    url = upstream._chat_url
    pool = upstream._chat_pool
    assert url is not None and pool is not None, "the upstream must be plain http://"
    headers = [("Content-Type", "application/json")]

    async def via_aiohttp() -> tuple[int, bytes]:
        status, _headers, data = await upstream.send("POST", url, headers, body, decompress=True)
        return status, data

    async def via_chatpool() -> tuple[int, bytes]:
        status, _headers, data = await pool.post(b"", b"", body)
        return status, data

    return {"aiohttp": via_aiohttp, "chatpool": via_chatpool}


async def one_run(send: Any, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    ns = time.perf_counter_ns
    t0 = ns()
    t_start = t0 + int(warmup * 1e9)
    t_stop = t_start + int(duration * 1e9)
    lat: list[int] = []
    errors = 0
    cpu: list[float] = []

    async def worker() -> None:
        nonlocal errors
        while True:
            a = ns()
            if a >= t_stop:
                return
            try:
                status, data = await send()
            except Exception:
                errors += 1
                continue
            b = ns()
            if status != 200 or not data:
                errors += 1
            elif a >= t_start:
                lat.append(b - a)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, (t_start - ns()) / 1e9))
        cpu.append(time.process_time())

    mark = asyncio.ensure_future(cpu_marks())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await mark
    t_end = ns()
    cpu_s = time.process_time() - cpu[0]
    window = (t_end - t_start) / 1e9
    lat.sort()
    n = len(lat)
    return {
        "requests": n,
        "requests_per_s": n / window,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "max_ms": lat[-1] / 1e6 if lat else float("nan"),
        "client_cpu_us": cpu_s / n * 1e6 if n else float("nan"),
        "errors": errors,
    }


async def run(echo_url: str, a: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(
        None,
        environ={"ROLLOUT_SESSIONS_UPSTREAM": echo_url, "ROLLOUT_SESSIONS_LOG_LEVEL": "warning"},
    )
    upstream = Upstream(settings)
    await upstream.start()
    body = chat_body()
    senders = make_senders(upstream, body)
    try:
        # Both answer the same thing (and the connections are open) before timing.
        answers = {}
        for name, send in senders.items():
            status, data = await send()
            if status != 200:
                raise RuntimeError(f"{name}: status {status}: {data[:200]!r}")
            answers[name] = orjson.loads(data)["choices"][0]["meta_info"]["output_token_logprobs"]
        if answers["aiohttp"] != answers["chatpool"]:
            raise RuntimeError("the two clients got different answers")
        levels: dict[str, Any] = {}
        for c in a.levels:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CLIENTS}
            for r in range(a.rounds):
                order = CLIENTS if r % 2 == 0 else tuple(reversed(CLIENTS))
                for name in order:
                    out = await one_run(senders[name], c, a.duration, a.warmup)
                    runs[name].append(out)
                    print(
                        f"c={c} round={r + 1} {name:8} req/s {out['requests_per_s']:8,.0f}  "
                        f"p50 {out['p50_ms']:7.3f} ms  p99 {out['p99_ms']:7.3f} ms  "
                        f"client cpu {out['client_cpu_us']:6.1f} us/req  errors {out['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
            levels[str(c)] = {
                name: {
                    "requests_per_s": median([x["requests_per_s"] for x in rs]),
                    "p50_ms": median([x["p50_ms"] for x in rs]),
                    "p99_ms": median([x["p99_ms"] for x in rs]),
                    "client_cpu_us": median([x["client_cpu_us"] for x in rs]),
                    "errors": sum(x["errors"] for x in rs),
                    "rounds": rs,
                }
                for name, rs in runs.items()
            }
        return {"body_bytes": len(body), "levels": levels}
    finally:
        await upstream.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,64", help="comma list of requests in flight")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per client")
    p.add_argument("--echo-url", help="use a running echo backend instead of starting one")
    p.add_argument("--json", type=Path, default=RESULTS / "upstream_client.json")
    a = p.parse_args(argv)
    a.levels = [int(x) for x in a.concurrency.split(",")]

    import uvloop

    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(started("echo", lambda port: echo_argv(port), a.echo_url))
        check_loopback(echo)
        out = uvloop.run(run(echo, a))

    print(f"\n== upstream client, chat body of {out['body_bytes']} B, median of {a.rounds} ==")
    print(
        f"{'in flight':>9} {'client':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cpu us/req':>10} {'errors':>6}"
    )
    for c, d in out["levels"].items():
        for name, m in d.items():
            print(
                f"{c:>9} {name:9} {m['requests_per_s']:>9,.0f} {m['p50_ms']:>8.3f} "
                f"{m['p99_ms']:>8.3f} {m['client_cpu_us']:>10.1f} {m['errors']:>6}"
            )
        ratio = d["chatpool"]["requests_per_s"] / d["aiohttp"]["requests_per_s"]
        print(f"{'':>9} chatpool/aiohttp requests/s: {ratio:.2f}x")
    res = {"params": {k: str(v) for k, v in vars(a).items()}, **out}
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
