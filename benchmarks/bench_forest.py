"""Tree mode over HTTP, A/B against linear mode in one run.

1. The realistic linear workload (``bench_realistic.py``'s: 8 turns of ~800
   generated words and 400-word tool results, through ``loadgen.py``) on a
   linear server and on a tree server (``--trajectory tree``), rounds
   alternating: server CPU per turn, turns/s, and resident memory per kept
   session. Targets: tree at most 1.05x linear for CPU per turn and for
   memory per kept session.
2. The branchy workload, against the linear workload, with one client (this
   process, aiohttp): 8-turn realistic sessions where every second turn is
   retried once from two steps back (a sibling of the turn before it, or a
   second root), the history compacted into a summary at turn 5 (a new root
   the last turns extend), and a 3-turn sub-agent with its own system
   prompt (a third root): 15 nodes per session, on a tree server; the
   linear workload's 8 turns on a linear server. Targets: resident memory
   per node at most 1.2x the memory per turn of the linear workload; turns/s
   at least 0.9x linear's.

Both servers keep the journal on (the default) and forward to one
``realistic_backend.py``.

    .venv/bin/python benchmarks/bench_forest.py [--concurrency 32] [--duration 6] \\
        [--rounds 3] [--keep-sessions 150]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_realistic import backend_argv, cpu_seconds, memory, rss_bytes, throughput  # noqa: E402
from benchutil import RESULTS, finish, median, ours_argv, started_process  # noqa: E402
from loadgen import tool_result  # noqa: E402

NODES_PER_BRANCHY_SESSION = 15


class Client:
    """Sessions over one pooled aiohttp client; counts turns."""

    def __init__(self, url: str, tool_words: int) -> None:
        self.url = url
        self.tool = tool_result(tool_words)
        self.turns = 0
        self.errors = 0
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=0)
        self.http = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.http is not None
        await self.http.close()

    async def turn(self, sid: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.http is not None
        body = orjson.dumps({"model": "m", "messages": messages})
        async with self.http.post(
            f"{self.url}/sessions/{sid}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        ) as resp:
            data = await resp.read()
            if resp.status != 200:
                self.errors += 1
                raise RuntimeError(f"turn: {resp.status} {data[:200]!r}")
        self.turns += 1
        message = orjson.loads(data)["choices"][0]["message"]
        return {"role": "assistant", "content": message["content"]}

    async def finish(self, sid: str) -> None:
        assert self.http is not None
        async with self.http.get(f"{self.url}/sessions/{sid}") as resp:
            await resp.read()
        async with self.http.delete(f"{self.url}/sessions/{sid}") as resp:
            await resp.read()

    def start(self, system: str = "You are an agent.") -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": "solve " + self.tool},
        ]

    def result(self, k: int, variant: str = "") -> dict[str, Any]:
        return {"role": "tool", "content": f"{k}{variant} {self.tool}"}

    async def linear(self, sid: str) -> None:
        messages = self.start()
        for k in range(8):
            answer = await self.turn(sid, messages)
            messages = [*messages, answer, self.result(k)]

    async def branchy(self, sid: str) -> None:
        messages = self.start()
        history = [messages]  # the request of each main-line turn
        for k in range(8):
            if k == 5:  # compaction: the history becomes a summary (a new root)
                messages = [
                    messages[0],
                    {"role": "user", "content": f"summary of turns 0-4: {self.tool}"},
                ]
            answer = await self.turn(sid, messages)
            history.append(messages)
            if k % 2 == 1:  # retried once from two steps back
                back = history[-2]
                await self.turn(sid, [*back[:-1], self.result(k - 1, "retry")] if k > 1 else back)
            messages = [*messages, answer, self.result(k)]
            if k == 3:  # a sub-agent with its own system prompt: 3 turns, a new root
                sub = self.start("You are a sub-agent that reads files.")
                for j in range(3):
                    reply = await self.turn(sid, sub)
                    sub = [*sub, reply, self.result(100 + j)]


async def run_load(
    url: str, workload: str, concurrency: int, duration: float, keep: int | None, tool_words: int
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients running sessions back to back for
    ``duration`` seconds (or ``keep`` sessions in all, never deleted)."""
    async with Client(url, tool_words) as client:
        deadline = time.monotonic() + duration
        counter = itertools.count()
        sessions = 0

        async def worker() -> None:
            nonlocal sessions
            while True:
                if keep is not None:
                    if next(counter) >= keep:
                        return
                elif time.monotonic() > deadline:
                    return
                sid = uuid.uuid4().hex[:24]
                await getattr(client, workload)(sid)
                sessions += 1
                if keep is None:
                    await client.finish(sid)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        return {
            "turns": client.turns,
            "sessions": sessions,
            "turns_per_s": client.turns / elapsed,
            "errors": client.errors,
        }


def one_round(proc: psutil.Process, url: str, workload: str, a: argparse.Namespace) -> dict:
    before = cpu_seconds(proc)
    out = asyncio.run(run_load(url, workload, a.concurrency, a.duration, None, a.tool_words))
    out["cpu_ms_per_turn"] = (cpu_seconds(proc) - before) * 1000 / max(1, out["turns"])
    return out


def kept_memory(
    name: str, argv: Any, workload: str, a: argparse.Namespace, sessions: int
) -> dict[str, Any]:
    with started_process(name, argv) as server:
        proc = psutil.Process(server.pid)
        warm = asyncio.run(run_load(server.url, workload, a.concurrency, 0, 32, a.tool_words))
        time.sleep(1.0)
        before = rss_bytes(proc)
        out = asyncio.run(run_load(server.url, workload, a.concurrency, 0, sessions, a.tool_words))
        time.sleep(1.0)
        after = rss_bytes(proc)
    per_turn = (after - before) / max(1, out["turns"])
    print(
        f"{name:9} {workload:7} RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB over "
        f"{out['sessions']} kept sessions, {out['turns']} turns: {per_turn / 1024:.1f} KiB per "
        f"turn (node)"
    )
    del warm
    return {
        "rss_before": before,
        "rss_after": after,
        "sessions": out["sessions"],
        "turns": out["turns"],
        "bytes_per_turn": per_turn,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--completion-words", type=int, default=800)
    p.add_argument("--keep-sessions", type=int, default=150)
    p.add_argument("--skip-linear-ab", action="store_true")
    p.add_argument("--json", type=Path, default=RESULTS / "forest.json")
    a = p.parse_args()
    res: dict[str, Any] = {"args": {k: v for k, v in vars(a).items() if k != "json"}}
    targets = []
    with started_process("backend", backend_argv(a.completion_words)) as backend:
        argvs = {
            "linear": ours_argv(backend.url),
            "tree": ours_argv(backend.url, "--trajectory", "tree"),
        }
        if not a.skip_linear_ab:
            # 1. the realistic linear workload, both modes (loadgen.py)
            ab = argparse.Namespace(
                concurrency=[a.concurrency], rates=[], rounds=a.rounds, duration=a.duration,
                turns=a.turns, tool_words=a.tool_words, keep_sessions=a.keep_sessions,
            )  # fmt: skip
            with contextlib.ExitStack() as stack:
                servers = {}
                for name, argv in argvs.items():
                    proc = stack.enter_context(started_process(name, argv))
                    servers[name] = (psutil.Process(proc.pid), proc.url)
                res["linear_workload"] = throughput(servers, ab)[str(a.concurrency)]
            res["linear_workload_memory"] = {
                name: memory(name, argv, ab) for name, argv in argvs.items()
            }
            row = res["linear_workload"]
            cpu = row["tree"]["cpu_ms_per_turn"] / row["linear"]["cpu_ms_per_turn"]
            mem = res["linear_workload_memory"]
            kept = mem["tree"]["bytes_per_session"] / mem["linear"]["bytes_per_session"]
            targets += [
                {
                    "target": "linear workload: tree CPU per turn <= 1.05x linear mode's",
                    "value": cpu,
                    "met": cpu <= 1.05,
                },
                {
                    "target": "linear workload: tree memory per kept session <= 1.05x linear's",
                    "value": kept,
                    "met": kept <= 1.05,
                },
            ]
        # 2. the branchy workload on tree against the linear workload on linear
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, argv in argvs.items():
                proc = stack.enter_context(started_process(name, argv))
                servers[name] = (psutil.Process(proc.pid), proc.url)
            runs: dict[str, list[dict[str, Any]]] = {"linear": [], "tree": []}
            for r in range(a.rounds):
                for name in ("linear", "tree") if r % 2 == 0 else ("tree", "linear"):
                    proc, url = servers[name]
                    workload = "linear" if name == "linear" else "branchy"
                    out = one_round(proc, url, workload, a)
                    runs[name].append(out)
                    print(
                        f"{name:7} {workload:8} {out['turns_per_s']:7.1f} turns/s  CPU "
                        f"{out['cpu_ms_per_turn']:.2f} ms/turn  errors {out['errors']}"
                    )
        res["branchy"] = {
            name: {
                "turns_per_s": median([x["turns_per_s"] for x in rs]),
                "cpu_ms_per_turn": median([x["cpu_ms_per_turn"] for x in rs]),
                "errors": sum(x["errors"] for x in rs),
                "rounds": rs,
            }
            for name, rs in runs.items()
        }
        # As many turns kept on each (RSS moves by a few MiB on its own: compare
        # like amounts).
        linear_sessions = a.keep_sessions * NODES_PER_BRANCHY_SESSION // a.turns
        res["branchy_memory"] = {
            "linear": kept_memory("linear", argvs["linear"], "linear", a, linear_sessions),
            "tree": kept_memory("tree", argvs["tree"], "branchy", a, a.keep_sessions),
        }
    speed = res["branchy"]["tree"]["turns_per_s"] / res["branchy"]["linear"]["turns_per_s"]
    mem = res["branchy_memory"]
    per_node = mem["tree"]["bytes_per_turn"] / mem["linear"]["bytes_per_turn"]
    targets += [
        {
            "target": "branchy workload: memory per node <= 1.2x linear's per turn",
            "value": per_node,
            "met": per_node <= 1.2,
        },
        {
            "target": "branchy workload: turns/s >= 0.9x linear's",
            "value": speed,
            "met": speed >= 0.9,
        },
    ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
