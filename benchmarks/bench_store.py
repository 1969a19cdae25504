"""The trajectory store on realistic sessions: memory per session at 8 and 32 turns,
the cost of ``GET`` and of the samples export, and chat CPU per turn.

``serve --no-journal`` (everything in memory) forwarding to the realistic
backend (~800-token answers with both kinds of logprobs, 400-word tool
results). For 8 and then 32 turns per session, ``--sessions`` sessions are
run and kept; resident memory before and after gives the cost per session.
Then every 32-turn session is read with ``GET`` (``--gets`` times each) and
exported (``POST /sessions/{id}/samples``): server CPU per call and the
client's time per export.

With ``--baseline-src DIR`` the same runs on the server built from another
source tree (``PYTHONPATH=DIR``), in the same run: the comparison for "GET
costs at most 2x the splice of stored bytes" and "chat CPU per turn rises at
most 10%" (the tree before the store: ``git worktree add /tmp/splice c5bc2a3``,
then build it in place with ``python setup.py build_ext --inplace`` there).

    .venv/bin/python benchmarks/bench_store.py
    .venv/bin/python benchmarks/bench_store.py --baseline-src /tmp/splice/src

Targets: 32 turns cost at most 4.5x 8 turns; the export of a 32k-token
session under 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_realistic import backend_argv, cpu_seconds, load_args, rss_bytes  # noqa: E402
from benchutil import RESULTS, finish, run_loadgen, started_process  # noqa: E402

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv  # noqa: E402


async def timed_calls(url: str, calls: list[tuple[str, str, Any]]) -> list[float]:
    """Each call in turn on one connection; the client's seconds per call."""
    times = []
    async with aiohttp.ClientSession() as http:
        for method, path, body in calls:
            t = time.perf_counter()
            async with http.request(
                method, url + path, json=body, headers={"Accept": "application/json"}
            ) as r:
                await r.read()
                assert r.status == 200, r.status
            times.append(time.perf_counter() - t)
    return times


def fill(server: ManagedProcess, a: argparse.Namespace, turns: int, ids_file: Path) -> dict:
    proc = psutil.Process(server.pid)
    a.turns = turns
    time.sleep(0.5)
    rss0, cpu0 = rss_bytes(proc), cpu_seconds(proc)
    out = run_loadgen(
        *load_args(server.url, a, 16, 3600, "--keep", "--sessions", str(a.sessions)),
        "--ids-out",
        str(ids_file),
    )
    time.sleep(0.5)
    rss1, cpu1 = rss_bytes(proc), cpu_seconds(proc)
    return {
        "turns": out["units"],
        "bytes_per_session": (rss1 - rss0) / a.sessions,
        "chat_cpu_ms_per_turn": (cpu1 - cpu0) * 1000 / max(1, out["units"]),
    }


def fresh_server(backend_url: str, env: dict | None, work: Path) -> ManagedProcess:
    flags = ["--upstream", backend_url, "--log-level", "warning"]
    if env is None:  # this tree: memory only (a tree from before the journal has no flag)
        flags.append("--no-journal")
    port = free_port()
    server = ManagedProcess(serve_argv(port, *flags), port, env=env, cwd=work)
    server.wait_healthy(timeout=60)
    return server


def measure(name: str, backend_url: str, a: argparse.Namespace, env: dict | None) -> dict:
    """Per session length, a fresh server: a warm-up of 32 sessions of that length
    (its transient buffers reach their high-water mark), then the kept sessions."""
    work = Path(tempfile.mkdtemp(prefix=f"rollout-sessions-bench-store-{name}-"))
    res: dict[str, Any] = {}
    for turns in (8, 32):
        with fresh_server(backend_url, env, work) as server:
            a.turns = turns
            run_loadgen(*load_args(server.url, a, 16, 3600, "--keep", "--sessions", "32"))
            ids_file = work / f"ids-{turns}.txt"
            res[str(turns)] = fill(server, a, turns, ids_file)
            if turns == 32:
                res.update(read_costs(name, server, ids_file.read_text().split(), a))
    print(
        f"{name:8} 8 turns {res['8']['bytes_per_session'] / 1024:6.0f} KiB/session, "
        f"32 turns {res['32']['bytes_per_session'] / 1024:6.0f} KiB/session; chat CPU "
        f"{res['8']['chat_cpu_ms_per_turn']:.2f} ms/turn; GET of 32 turns "
        f"{res['get_cpu_ms']:.2f} ms CPU"
        + (
            f"; export of {res['export_tokens']} tokens {res['export_p50_ms']:.2f} ms "
            f"({res['export_cpu_ms']:.2f} ms CPU)"
            if "export_p50_ms" in res
            else ""
        )
    )
    return res


def read_costs(
    name: str, server: ManagedProcess, ids: list[str], a: argparse.Namespace
) -> dict[str, Any]:
    """Server CPU per GET of each session, and (this tree) per samples export."""
    proc = psutil.Process(server.pid)
    out: dict[str, Any] = {}
    gets = [("GET", f"/sessions/{sid}", None) for sid in ids for _ in range(a.gets)]
    cpu0 = cpu_seconds(proc)
    times = asyncio.run(timed_calls(server.url, gets))
    out["get_cpu_ms"] = (cpu_seconds(proc) - cpu0) * 1000 / len(gets)
    out["get_p50_ms"] = statistics.median(times) * 1000
    if name == "store":
        exports = [("POST", f"/sessions/{sid}/samples", {}) for sid in ids]
        cpu0 = cpu_seconds(proc)
        times = asyncio.run(timed_calls(server.url, exports))
        out["export_cpu_ms"] = (cpu_seconds(proc) - cpu0) * 1000 / len(exports)
        out["export_p50_ms"] = statistics.median(times) * 1000
        out["export_tokens"] = asyncio.run(sample_length(server.url, ids[0]))
    return out


async def sample_length(url: str, sid: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/sessions/{sid}/samples", json={}, headers={"Accept": "application/json"}
        ) as r:
            return len((await r.json())["tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--gets", type=int, default=5)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--completion-words", type=int, default=800)
    p.add_argument("--baseline-src", help="a source tree to compare with (PYTHONPATH)")
    p.add_argument("--json", type=Path, default=RESULTS / "store.json")
    a = p.parse_args()
    res: dict[str, Any] = {"params": {k: str(v) for k, v in vars(a).items()}}
    with started_process("backend", backend_argv(a.completion_words)) as backend:
        assert backend is not None
        res["store"] = measure("store", backend.url, a, None)
        if a.baseline_src:
            res["splice"] = measure("splice", backend.url, a, {"PYTHONPATH": a.baseline_src})
    s = res["store"]
    growth = s["32"]["bytes_per_session"] / s["8"]["bytes_per_session"]
    targets = [
        {"target": "32 turns cost <= 4.5x 8 turns", "value": growth, "met": growth <= 4.5},
        {
            "target": f"export of a {s['export_tokens']}-token session < 5 ms",
            "value": s["export_p50_ms"],
            "met": s["export_p50_ms"] < 5,
        },
    ]
    if "splice" in res:
        get_ratio = s["get_cpu_ms"] / res["splice"]["get_cpu_ms"]
        chat_ratio = s["8"]["chat_cpu_ms_per_turn"] / res["splice"]["8"]["chat_cpu_ms_per_turn"]
        targets += [
            {
                "target": "GET of 32 turns <= 2x the splice's CPU",
                "value": get_ratio,
                "met": get_ratio <= 2,
            },
            {
                "target": "chat CPU per turn <= 1.1x the splice build's",
                "value": chat_ratio,
                "met": chat_ratio <= 1.1,
            },
        ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
