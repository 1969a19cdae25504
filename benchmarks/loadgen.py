"""Load generator: many concurrent HTTP clients over loopback, in its own process.

Three scenarios, each bounded by a count *and* a duration, each printing one
JSON line (and a human line on stderr):

    # per session: POST /sessions, GET /sessions/{id}, DELETE /sessions/{id}
    python benchmarks/loadgen.py lifecycle --url http://127.0.0.1:8000 \
        --concurrency 64 --duration 10

    # chat turns through sessions (or --direct: straight at the backend)
    python benchmarks/loadgen.py chat --url http://127.0.0.1:8000 \
        --concurrency 64 --duration 10 --turns-per-session 8

    # realistic turns (against benchmarks/realistic_backend.py): 8 turns per
    # session, 400-word tool results, history growing, then GET and DELETE
    python benchmarks/loadgen.py realistic --url http://127.0.0.1:8000 \
        --concurrency 64 --duration 10 [--keep --sessions 500]

    # the same bytes through the generic forwarding route (no session work):
    # what the HTTP stack alone costs per turn
    python benchmarks/loadgen.py realistic --url http://127.0.0.1:8000 --forwarded

    # the same turns as an agent's tool steps: the backend answers each with a
    # tool call (--tools), sent as chat completions or as Anthropic Messages
    # (--protocol anthropic, through /sessions/{id}/v1/messages)
    python benchmarks/loadgen.py realistic --url http://127.0.0.1:8000 --tools
    python benchmarks/loadgen.py realistic --url http://127.0.0.1:8000 --protocol anthropic

    # the same sessions in an open loop: 30 arriving per second, whatever the
    # server's speed (--concurrency caps those in flight)
    python benchmarks/loadgen.py realistic --url http://127.0.0.1:8000 \
        --rate 30 --concurrency 1024 --duration 10

Every client holds one keep-alive connection (``httpload.HttpClient``), runs on uvloop,
and times each request with ``perf_counter_ns``. Requests that finish during
the warm-up are not counted. Only loopback targets are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpload import (  # noqa: E402
    HttpClient,
    HttpError,
    chat_request,
    check_loopback,
    create_session,
    delete_session,
    get_session,
    percentile,
)

from rollout_sessions.testing.client import (  # noqa: E402
    chat_path,
    first_messages,
    next_messages,
)

# A route the realistic backend answers as chat, and that the server's chat
# route does not match: turns sent there take the generic forwarding route.
FORWARDED_CHAT = "v1/forwarded/chat/completions"

# The tool of the agent workload (--tools, --protocol anthropic), in both
# protocols' words; both translate to the same chat request.
AGENT_SYSTEM = "You are an agent."
AGENT_MAX_TOKENS = 4096
AGENT_TOOL = {
    "name": "search",
    "description": "search the repository",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}
CHAT_AGENT_TOOL = {
    "type": "function",
    "function": {
        "name": AGENT_TOOL["name"],
        "description": AGENT_TOOL["description"],
        "parameters": AGENT_TOOL["input_schema"],
    },
}


@dataclass
class Recorder:
    """Latencies (ns) and counts, only inside the measured window."""

    t_start: int  # perf_counter_ns at which measuring begins (after warm-up)
    t_stop: int  # perf_counter_ns at which clients stop starting work
    lat: dict[str, list[int]] = field(default_factory=dict)
    units: int = 0  # completed lifecycles / turns inside the window
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    t_last: int = 0

    def add(self, kind: str, t0: int, t1: int) -> None:
        if t0 >= self.t_start:
            self.lat.setdefault(kind, []).append(t1 - t0)
            self.t_last = max(self.t_last, t1)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)

    def summary(self) -> dict[str, Any]:
        window = max(1, self.t_last - self.t_start) / 1e9
        out: dict[str, Any] = {
            "window_s": window,
            "units": self.units,
            "units_per_s": self.units / window,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "latency_ms": {},
        }
        everything: list[int] = []
        for kind, values in self.lat.items():
            everything += values
            out["latency_ms"][kind] = _dist(values)
        if len(self.lat) > 1:
            out["latency_ms"]["all"] = _dist(everything)
        out["requests"] = len(everything)
        out["requests_per_s"] = len(everything) / window
        return out


def _dist(values: list[int]) -> dict[str, float]:
    s = sorted(values)
    return {
        "n": len(s),
        "p50": percentile(s, 50) / 1e6,
        "p90": percentile(s, 90) / 1e6,
        "p99": percentile(s, 99) / 1e6,
        "max": (s[-1] / 1e6) if s else float("nan"),
        "mean": (sum(s) / len(s) / 1e6) if s else float("nan"),
    }


async def _lifecycle_client(url: str, rec: Recorder, budget: list[int]) -> None:
    client = HttpClient.for_url(url, timeout=30.0)
    ns = time.perf_counter_ns
    try:
        while budget[0] > 0 and ns() < rec.t_stop:
            budget[0] -= 1
            try:
                t0 = ns()
                status, sid = await create_session(client)
                t1 = ns()
                if status != 200:
                    rec.error(f"create: {status}")
                    continue
                status, _ = await get_session(client, sid)
                t2 = ns()
                if status != 200:
                    rec.error(f"get {sid}: {status}")
                status3 = await delete_session(client, sid)
                t3 = ns()
                if status3 != 204:
                    rec.error(f"delete {sid}: {status3}")
                    continue
            except HttpError as e:
                rec.error(str(e))
                continue
            rec.add("create", t0, t1)
            rec.add("get", t1, t2)
            rec.add("delete", t2, t3)
            if t0 >= rec.t_start:
                rec.units += 1
    finally:
        await client.close()


async def _timed_turn(
    rec: Recorder, client: HttpClient, path: str, body: bytes, what: str
) -> bytes | None:
    """One timed chat turn: its answer, or None once its failure is recorded."""
    t0 = time.perf_counter_ns()
    status, data = await client.request("POST", path, body)
    t1 = time.perf_counter_ns()
    if status != 200:
        rec.error(f"{what}: {status} {data[:160]!r}")
        return None
    rec.add("turn", t0, t1)
    if t0 >= rec.t_start:
        rec.units += 1
    return data


async def _chat_client(
    url: str, rec: Recorder, budget: list[int], direct: bool, turns_per_session: int, n: int
) -> None:
    client = HttpClient.for_url(url, timeout=120.0)
    ns = time.perf_counter_ns
    conversation = n
    try:
        while budget[0] > 0 and ns() < rec.t_stop:
            # A new session (not timed), a few turns (timed), a delete (not timed).
            sid = None
            try:
                if not direct:
                    status, sid = await create_session(client)
                    if status != 200:
                        rec.error(f"create: {status}")
                        continue
                messages = first_messages(conversation)
                conversation += 1_000_000
                for t in range(turns_per_session):
                    if budget[0] <= 0 or ns() >= rec.t_stop:
                        break
                    budget[0] -= 1
                    path, body = chat_request(sid, messages)
                    data = await _timed_turn(rec, client, path, body, f"chat {sid} turn {t}")
                    if data is None:
                        break
                    messages = next_messages(messages, data, t)
                if sid is not None:
                    status = await delete_session(client, sid)
                    if status != 204:
                        rec.error(f"delete {sid}: {status}")
            except HttpError as e:
                rec.error(str(e))
    finally:
        await client.close()


async def _realistic_session(
    client: HttpClient, rec: Recorder, budget: list[int], a: argparse.Namespace, tool: str
) -> None:
    """One session of ``a.turns`` realistic turns: a 400-word tool result after
    each answer, the history growing; then GET and DELETE (unless ``a.keep``).
    Only chat turns are timed; every request counts in the server's CPU."""
    try:
        status, sid = await create_session(client)
        if status != 200:
            rec.error(f"create: {status}")
            return
        if a.protocol == "anthropic":
            await _anthropic_turns(client, rec, budget, a, tool, sid)
        else:
            await _chat_turns(client, rec, budget, a, tool, sid)
        if not a.keep:
            await get_session(client, sid)
            await delete_session(client, sid)
        elif a.ids_out:
            with open(a.ids_out, "a") as out:
                out.write(sid + "\n")
    except HttpError as e:
        rec.error(str(e))


async def _chat_turns(
    client: HttpClient, rec: Recorder, budget: list[int], a: argparse.Namespace, tool: str, sid: str
) -> None:
    path = f"/sessions/{sid}/{FORWARDED_CHAT}" if a.forwarded else chat_path(sid)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": AGENT_SYSTEM},
        {"role": "user", "content": "solve " + tool},
    ]
    extra: dict[str, Any] = {}
    if a.tools:
        extra = {"max_tokens": AGENT_MAX_TOKENS, "tools": [CHAT_AGENT_TOOL]}
    for k in range(a.turns):
        budget[0] -= 1
        body = json.dumps({"model": "m", "messages": messages, **extra}).encode()
        data = await _timed_turn(rec, client, path, body, f"chat {sid} turn {k}")
        if data is None:
            break
        message = json.loads(data)["choices"][0]["message"]
        result: dict[str, Any] = {"role": "tool", "content": f"{k} {tool}"}
        if a.tools:  # the message as the backend sent it, as agents send it back
            assistant = message
            call_id = message["tool_calls"][0]["id"]
            result = {"role": "tool", "tool_call_id": call_id, "content": f"{k} {tool}"}
        else:
            assistant = {"role": "assistant", "content": message["content"]}
        messages = [*messages, assistant, result]


async def _anthropic_turns(
    client: HttpClient, rec: Recorder, budget: list[int], a: argparse.Namespace, tool: str, sid: str
) -> None:
    """The --tools conversation as an Anthropic client sends it."""
    path = f"/sessions/{sid}/v1/messages"
    messages: list[dict[str, Any]] = [{"role": "user", "content": "solve " + tool}]
    for k in range(a.turns):
        budget[0] -= 1
        body = json.dumps(
            {
                "model": "m",
                "max_tokens": AGENT_MAX_TOKENS,
                "system": AGENT_SYSTEM,
                "messages": messages,
                "tools": [AGENT_TOOL],
            }
        ).encode()
        data = await _timed_turn(rec, client, path, body, f"messages {sid} turn {k}")
        if data is None:
            break
        content = json.loads(data)["content"]
        use = next(block for block in content if block["type"] == "tool_use")
        result = {"type": "tool_result", "tool_use_id": use["id"], "content": f"{k} {tool}"}
        messages = [
            *messages,
            {"role": "assistant", "content": content},
            {"role": "user", "content": [result]},
        ]


def tool_result(words: int) -> str:
    """The realistic workload's tool result: ``words`` made-up words."""
    return " ".join(f"t{i % 991}" for i in range(words))


async def _realistic_client(
    url: str, rec: Recorder, budget: list[int], a: argparse.Namespace, sessions: list[int]
) -> None:
    """Closed loop: one client running sessions back to back."""
    client = HttpClient.for_url(url, timeout=300.0)
    ns = time.perf_counter_ns
    tool = tool_result(a.tool_words)
    try:
        while budget[0] > 0 and ns() < rec.t_stop and sessions[0] > 0:
            sessions[0] -= 1
            await _realistic_session(client, rec, budget, a, tool)
    finally:
        await client.close()


async def _realistic_open(
    url: str, rec: Recorder, budget: list[int], a: argparse.Namespace
) -> None:
    """Open loop: sessions arrive at ``a.rate`` per second (Poisson, the same
    seeded sequence every run) whatever the server's speed, each on an idle
    keep-alive connection of a pool (a new one when none is idle); the turns
    of a session follow each other. An arrival finding ``a.concurrency``
    sessions in flight is not started and counts as an error: the offered
    load is then above what the server keeps up with."""
    ns = time.perf_counter_ns
    rng = random.Random(20261127)
    tool = tool_result(a.tool_words)
    idle: list[HttpClient] = []
    everyone: list[HttpClient] = []
    running: set[asyncio.Task] = set()

    async def session(client: HttpClient) -> None:
        try:
            await _realistic_session(client, rec, budget, a, tool)
        finally:
            idle.append(client)

    due = ns()
    try:
        while budget[0] > 0 and ns() < rec.t_stop:
            due += int(rng.expovariate(a.rate) * 1e9)
            wait = (due - ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            if len(running) >= a.concurrency:
                rec.error(f"arrival refused: {a.concurrency} sessions in flight")
                continue
            if not idle:
                client = HttpClient.for_url(url, timeout=300.0)
                everyone.append(client)
                idle.append(client)
            task = asyncio.create_task(session(idle.pop()))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    finally:
        for client in everyone:
            await client.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    now = time.perf_counter_ns()
    rec = Recorder(
        t_start=now + int(args.warmup * 1e9), t_stop=now + int((args.warmup + args.duration) * 1e9)
    )
    budget = [args.max_units]  # shared countdown: clients stop at zero
    if args.scenario == "lifecycle":
        clients = [_lifecycle_client(args.url, rec, budget) for _ in range(args.concurrency)]
    elif args.scenario == "realistic":
        sessions = [args.sessions or 1 << 62]
        clients = (
            [_realistic_open(args.url, rec, budget, args)]
            if args.rate
            else [
                _realistic_client(args.url, rec, budget, args, sessions)
                for _ in range(args.concurrency)
            ]
        )
    else:
        clients = [
            _chat_client(args.url, rec, budget, args.direct, args.turns_per_session, i)
            for i in range(args.concurrency)
        ]
    await asyncio.gather(*clients)
    out = rec.summary()
    out.update(
        scenario=args.scenario,
        url=args.url,
        concurrency=args.concurrency,
        direct=getattr(args, "direct", False),
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="scenario", required=True)
    for name in ("lifecycle", "chat", "realistic"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True, help="server base URL (loopback only)")
        s.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
        s.add_argument("--duration", type=float, default=10.0, help="measured seconds")
        s.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
        s.add_argument(
            "--max-units",
            type=int,
            default=10_000_000,
            help="stop after this many lifecycles / turns in all (bounds the run)",
        )
        if name == "chat":
            s.add_argument("--direct", action="store_true", help="call the backend's own route")
            s.add_argument("--turns-per-session", type=int, default=8)
        if name == "realistic":
            s.add_argument("--turns", type=int, default=8, help="turns per session")
            s.add_argument("--tool-words", type=int, default=400, help="words per tool result")
            s.add_argument(
                "--sessions", type=int, default=0, help="stop after this many (0: no limit)"
            )
            s.add_argument("--keep", action="store_true", help="never GET or DELETE (memory study)")
            s.add_argument("--ids-out", help="with --keep: append each kept session's id here")
            s.add_argument(
                "--forwarded",
                action="store_true",
                help=f"send the turns through the generic forwarding route ({FORWARDED_CHAT}, "
                "which the realistic backend answers as chat): the same bytes, no session work",
            )
            s.add_argument(
                "--tools",
                action="store_true",
                help="an agent's tool steps: the request carries a tool, the realistic "
                "backend answers each turn with a tool call, the tool result carries its id",
            )
            s.add_argument(
                "--protocol",
                choices=("chat", "anthropic"),
                default="chat",
                help="anthropic: the --tools conversation as Anthropic Messages "
                "(/sessions/{id}/v1/messages)",
            )
            s.add_argument(
                "--rate",
                type=float,
                default=0.0,
                help="open loop: sessions started per second (--concurrency caps those in "
                "flight); 0: closed loop, --concurrency clients back to back",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_loopback(args.url)
    args.url = args.url.rstrip("/")
    import uvloop

    out = uvloop.run(run(args))
    lat = out["latency_ms"].get("all") or next(iter(out["latency_ms"].values()), {})
    print(
        f"{args.scenario} {args.url} c={args.concurrency}: {out['units_per_s']:,.0f}/s "
        f"p50 {lat.get('p50', float('nan')):.3f} ms p99 {lat.get('p99', float('nan')):.3f} ms "
        f"errors {out['errors']}",
        file=sys.stderr,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
