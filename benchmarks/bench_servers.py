"""HTTP server choice: the same app on uvicorn (as ``serve`` runs it) and on granian.

Both serve ``rollout_sessions.web.app`` with the same settings and the same
backend (``realistic_backend.py``); they differ only in the HTTP server:

- ``uvicorn``: ``rollout-sessions serve`` (uvicorn's httptools protocol with
  the head deadline, head size limit and connection cap of ``_uvicorn.py``);
- ``granian``: ``granian --interface asgi --factory rollout_sessions.web.app:app_from_env``
  (its Rust HTTP/1 stack, one worker, uvloop), ``--http 1`` so its header
  timeout also covers silent connections.

Measured in alternating rounds: realistic chat turns (turns/s, p50/p99,
server CPU per turn) and the lifecycle (requests/s, p50/p99, CPU per request).

    .venv/bin/python benchmarks/bench_servers.py --rounds 3 --duration 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_realistic import backend_argv, cpu_seconds, load_args  # noqa: E402
from benchutil import RESULTS, finish, median, ours_argv, run_loadgen, started_process  # noqa: E402


def granian_argv(port: int) -> list[str]:
    exe = str(Path(sys.executable).with_name("granian"))
    return [
        *(exe, "--interface", "asgi", "--factory", "--loop", "uvloop", "--http", "1"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--log-level", "warning", "rollout_sessions.web.app:app_from_env"),
    ]


def measure(proc: psutil.Process, load: list[str], per: str) -> dict[str, Any]:
    before = cpu_seconds(proc)
    out = run_loadgen(*load)
    cpu = cpu_seconds(proc) - before
    lat = out["latency_ms"].get("turn") or out["latency_ms"].get("all") or {}
    units = out["units"] if per == "turn" else out["requests"]
    return {
        "per_s": out["units_per_s"] if per == "turn" else out["requests_per_s"],
        "p50_ms": lat.get("p50", float("nan")),
        "p99_ms": lat.get("p99", float("nan")),
        "cpu_us": cpu * 1e6 / max(1, units),
        "errors": out["errors"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--chat-concurrency", type=int, default=64)
    p.add_argument("--lifecycle-concurrency", type=int, default=64)
    p.add_argument("--json", type=Path, default=RESULTS / "servers.json")
    a = p.parse_args()
    a.turns, a.tool_words = 8, 400
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    with started_process("backend", backend_argv(800)) as backend:
        up = backend.url
        os.environ["ROLLOUT_SESSIONS_UPSTREAM"] = up
        os.environ["ROLLOUT_SESSIONS_LOG_LEVEL"] = "warning"
        with (
            started_process("uvicorn", ours_argv(up)) as uv,
            started_process("granian", granian_argv) as gr,
        ):
            servers = {"uvicorn": uv, "granian": gr}
            for scenario, per in (("realistic", "turn"), ("lifecycle", "request")):
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
                for r in range(a.rounds):
                    order = list(servers) if r % 2 == 0 else list(reversed(servers))
                    for name in order:
                        srv = servers[name]
                        if scenario == "realistic":
                            load = load_args(srv.url, a, a.chat_concurrency, a.duration)
                        else:
                            load = ["lifecycle", "--url", srv.url, "--duration", str(a.duration)]
                            load += ["--concurrency", str(a.lifecycle_concurrency)]
                        runs[name].append(measure(psutil.Process(srv.pid), load, per))
                res[scenario] = {
                    name: {k: median([x[k] for x in rs]) for k in rs[0]} | {"rounds": rs}
                    for name, rs in runs.items()
                }
                for name, m in res[scenario].items():
                    print(
                        f"{scenario:9} {name:8} {m['per_s']:9.1f}/s  p50 {m['p50_ms']:7.2f} ms  "
                        f"p99 {m['p99_ms']:7.2f} ms  CPU {m['cpu_us']:8.1f} us/{per}  "
                        f"errors {m['errors']}"
                    )
    finish(res, [], a.json)


if __name__ == "__main__":
    main()
