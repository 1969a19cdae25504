"""Realistic chat turns: our server against the FastAPI reference, in one run.

The workload is what a rollout sends (``realistic_backend.py`` answers,
``loadgen.py realistic`` asks): answers of ~800 tokens with OpenAI-style
``logprobs.content`` and ``meta_info.output_token_logprobs``, tool results of
400 words, 8 turns per session with the history growing, then the harness's
GET and DELETE. Both servers forward to one backend process; the load
generator is its own process.

For each concurrency, rounds alternate the servers; each round reports
turns/s, p50/p99 of a turn, and the server's CPU (user + system of its
process tree over the round) per turn. Then, on fresh servers, resident
memory per kept session: RSS before and after ``--keep-sessions`` sessions
of 8 turns that are never deleted.

    .venv/bin/python benchmarks/bench_realistic.py
    .venv/bin/python benchmarks/bench_realistic.py --concurrency 16,64,256 --duration 8 \\
        --rounds 3 --keep-sessions 300

``--targets ours,ours_nojournal,reference,floor`` adds ``floor``: the same
turns sent through the generic forwarding route of ``serve --no-journal``
(nothing recorded, the final GET empty), i.e. what uvicorn, BlackSheep and
aiohttp cost per turn before the server does any work of its own.

``--baseline DIR`` adds ``baseline``: the same server from another checkout
(the build before, its extensions built in place with ``setup.py build_ext
--inplace``), for the A/B guards: CPU per turn and memory per kept session
within 3% of it.

``--rates 20,30`` adds open-loop rounds: sessions arrive at that rate
(Poisson, the same seeded sequence for every server) whatever the server's
speed, so a latency difference is the server's own and not the queue of a
saturated machine (in a closed loop, p99 follows turns/s). Use it with
``--targets ours,ours_nojournal``: the reference does not keep up.

    .venv/bin/python benchmarks/bench_realistic.py --no-memory --targets ours,ours_nojournal \\
        --concurrency "" --rates 20,30 --rounds 3 --duration 10

``--targets chat_tools,anthropic`` is the Anthropic Messages A/B: two
servers of the default configuration, one sent the agent workload as chat
completions (``loadgen.py realistic --tools``: every answer a tool call, every
tool result carrying its id), the other the same conversations as Anthropic
Messages (``--protocol anthropic``). After the rounds, one session of each is
kept and read back: their trajectories (forwarded requests, answers, token
ids) must be equal.

    .venv/bin/python benchmarks/bench_realistic.py --targets chat_tools,anthropic \
        --concurrency 16,64 --duration 8 --rounds 3 --no-memory \
        --json benchmarks/results/realistic_anthropic.json

Targets: server CPU per turn at most 1/15 of the reference's; Anthropic
Messages at most 1.15x the CPU per turn of the same turns as chat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import (  # noqa: E402
    HERE,
    RESULTS,
    finish,
    median,
    ours_argv,
    reference_argv,
    run_loadgen,
    started_process,
)


def backend_argv(words: int):
    return lambda port: [
        sys.executable,
        str(HERE / "realistic_backend.py"),
        "--port",
        str(port),
        "--completion-words",
        str(words),
    ]


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def rss_bytes(proc: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


OPEN_LOOP_CAP = 1024  # sessions in flight at most in an open-loop round


def load_args(url: str, a: argparse.Namespace, c: int, duration: float, *extra: str) -> list[str]:
    args = ["realistic", "--url", url, "--concurrency", str(c), "--turns", str(a.turns)]
    args += ["--tool-words", str(a.tool_words), "--duration", str(duration)]
    return [*args, "--warmup", "0", *extra]


# The load generator's extra arguments for a target: `floor` sends the same
# turns through the generic forwarding route (served by `serve --no-journal`),
# so its CPU per turn is what the HTTP stack costs with no session work.
LOAD_EXTRA = {
    "floor": ("--forwarded",),
    "chat_tools": ("--tools",),
    "anthropic": ("--protocol", "anthropic"),
}


def one_round(
    proc: psutil.Process, url: str, a: argparse.Namespace, load: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One round at ``load``: a client count (closed loop) or ``rate<R>`` (open loop,
    R sessions arriving per second)."""
    before = cpu_seconds(proc)
    if load.startswith("rate"):
        rate = ("--rate", load.removeprefix("rate"))
        out = run_loadgen(*load_args(url, a, OPEN_LOOP_CAP, a.duration, *rate, *extra))
    else:
        out = run_loadgen(*load_args(url, a, int(load), a.duration, *extra))
    cpu = cpu_seconds(proc) - before
    turns = max(1, out["units"])
    lat = out["latency_ms"].get("turn", {})
    return {
        "turns": out["units"],
        "turns_per_s": out["units_per_s"],
        "p50_ms": lat.get("p50", float("nan")),
        "p99_ms": lat.get("p99", float("nan")),
        "cpu_ms_per_turn": cpu * 1000 / turns,
        "errors": out["errors"],
        "error_samples": out["error_samples"],
    }


def throughput(servers: dict[str, tuple[psutil.Process, str]], a: argparse.Namespace) -> dict:
    out: dict[str, Any] = {}
    loads = [str(c) for c in a.concurrency] + [f"rate{r:g}" for r in a.rates]
    for c in loads:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for r in range(a.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                proc, url = servers[name]
                runs[name].append(one_round(proc, url, a, c, LOAD_EXTRA.get(name, ())))
        out[c] = {
            name: {
                key: median([x[key] for x in rs])
                for key in ("turns_per_s", "p50_ms", "p99_ms", "cpu_ms_per_turn")
            }
            | {"errors": sum(x["errors"] for x in rs), "rounds": rs}
            for name, rs in runs.items()
        }
        row = out[c]
        for name in servers:
            m = row[name]
            print(
                f"{c:<6} {name:9} {m['turns_per_s']:8.1f} turns/s  p50 {m['p50_ms']:8.1f} ms  "
                f"p99 {m['p99_ms']:8.1f} ms  CPU {m['cpu_ms_per_turn']:6.2f} ms/turn  "
                f"errors {m['errors']}"
            )
    return out


MEMORY_CLIENTS = 32


def memory(name: str, argv: Any, a: argparse.Namespace) -> dict[str, Any]:
    """RSS per kept session on a fresh server."""
    with started_process(name, argv) as server:
        proc = psutil.Process(server.pid)
        url = server.url
        # Warm-up at the measured concurrency: the turns in flight hold transient
        # buffers whose high-water mark RSS keeps; it must not be counted as the
        # kept sessions' cost.
        run_loadgen(*load_args(url, a, MEMORY_CLIENTS, 600, "--keep", "--sessions", "64"))
        time.sleep(1.0)
        before = rss_bytes(proc)
        kept = ("--keep", "--sessions", str(a.keep_sessions))
        out = run_loadgen(*load_args(url, a, MEMORY_CLIENTS, 600, *kept))
        time.sleep(1.0)
        after = rss_bytes(proc)
    sessions = max(1, out["units"] // a.turns)
    per = (after - before) / sessions
    print(
        f"{name:9} RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB over {sessions} kept "
        f"sessions: {per / 1024:.0f} KiB per session"
    )
    return {
        "rss_before": before,
        "rss_after": after,
        "sessions": sessions,
        "bytes_per_session": per,
    }


def kept_trajectory(url: str, a: argparse.Namespace, extra: tuple[str, ...]) -> dict[str, Any]:
    """One session of the workload, kept and read back: what it recorded."""
    with tempfile.NamedTemporaryFile("r", suffix=".ids") as ids:
        keep = ("--keep", "--sessions", "1", "--ids-out", ids.name, *extra)
        run_loadgen(*load_args(url, a, 1, 600, *keep))
        sid = ids.read().split()[0]
    with urllib.request.urlopen(f"{url}/sessions/{sid}", timeout=60) as resp:
        got = json.loads(resp.read())
    return {
        "requests": [record["request"] for record in got["records"]],
        "choices": [record["response"]["choices"] for record in got["records"]],
        "tokens": got["metadata"]["accumulated_token_ids"],
    }


def server_argvs(up: str, a: argparse.Namespace) -> dict[str, Any]:
    """The targets: our server as configured by default (journal on), without the
    journal, with token-in token-out, the FastAPI reference, and ``floor``
    (``LOAD_EXTRA``)."""
    argvs: dict[str, Any] = {
        "ours": ours_argv(up),
        "ours_nojournal": ours_argv(up, "--no-journal"),
        "reference": lambda port: reference_argv(port, up),
        "floor": ours_argv(up, "--no-journal"),
        # The Anthropic A/B: the default configuration twice, one per protocol.
        "chat_tools": ours_argv(up),
        "anthropic": ours_argv(up),
    }
    if a.tokenizer:
        argvs["ours_tito"] = ours_argv(up, "--tokenizer", a.tokenizer, "--tito-model", "qwen3")
    if a.baseline:
        # The build before, from its own checkout (its extensions built in place):
        # the same command, its package first on the path.
        src = str(Path(a.baseline).resolve() / "src")
        argvs["baseline"] = lambda port: ["env", f"PYTHONPATH={src}", *ours_argv(up)(port)]
        if a.tokenizer:
            tito = ours_argv(up, "--tokenizer", a.tokenizer, "--tito-model", "qwen3")
            argvs["baseline_tito"] = lambda port: ["env", f"PYTHONPATH={src}", *tito(port)]
    return {name: argvs[name] for name in a.targets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="16,64,256", help="closed loop: client counts")
    p.add_argument(
        "--rates",
        default="",
        help="open loop: sessions arriving per second (comma list), after the client counts",
    )
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--completion-words", type=int, default=800)
    p.add_argument("--keep-sessions", type=int, default=300)
    p.add_argument("--targets", default="ours,ours_nojournal,reference")
    p.add_argument("--tokenizer", help="a tokenizer directory: adds the ours_tito target")
    p.add_argument(
        "--baseline",
        help="a checkout of the build before (extensions built in place): adds the "
        "baseline target (and baseline_tito with --tokenizer), for the A/B guards (CPU per "
        "turn and memory per session)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the kept-session memory study")
    p.add_argument("--json", type=Path, default=RESULTS / "realistic.json")
    a = p.parse_args()
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    a.rates = [float(r) for r in a.rates.split(",") if r]
    a.targets = a.targets.split(",")
    if a.tokenizer and "ours_tito" not in a.targets:
        a.targets.append("ours_tito")
    if a.baseline and "baseline" not in a.targets:
        a.targets.append("baseline")
    if a.baseline and a.tokenizer and "baseline_tito" not in a.targets:
        a.targets.append("baseline_tito")
    res: dict[str, Any] = {"args": {k: v for k, v in vars(a).items() if k != "json"}}
    with started_process("backend", backend_argv(a.completion_words)) as backend:
        argvs = server_argvs(backend.url, a)
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, argv in argvs.items():
                proc = stack.enter_context(started_process(name, argv))
                servers[name] = (psutil.Process(proc.pid), proc.url)
            res["throughput"] = throughput(servers, a)
            if "chat_tools" in servers and "anthropic" in servers:
                kept = {
                    name: kept_trajectory(servers[name][1], a, LOAD_EXTRA[name])
                    for name in ("chat_tools", "anthropic")
                }
                res["equal_trajectories"] = kept["chat_tools"] == kept["anthropic"]
                res["kept_turns"] = {name: len(k["requests"]) for name, k in kept.items()}
                print(f"equal trajectories: {res['equal_trajectories']} {res['kept_turns']}")
        if not a.no_memory:
            res["memory"] = {
                name: memory(name, argv, a) for name, argv in argvs.items() if name != "floor"
            }
    targets = []
    for c, row in res["throughput"].items():
        at = f"c={c}" if c.isdigit() else f"{c.removeprefix('rate')} sessions/s"
        if "ours" in row and "reference" in row:
            ratio = row["reference"]["cpu_ms_per_turn"] / row["ours"]["cpu_ms_per_turn"]
            targets.append(
                {
                    "target": f"CPU per turn <= 1/15 of the reference at {at}",
                    "value": ratio,
                    "met": ratio >= 15,
                }
            )
        if "ours" in row and "ours_nojournal" in row:
            if c.isdigit():  # open loop: both serve the offered rate
                share = row["ours"]["turns_per_s"] / row["ours_nojournal"]["turns_per_s"]
                targets.append(
                    {
                        "target": f"turns/s journal on >= 85% of off at {at}",
                        "value": share,
                        "met": share >= 0.85,
                    }
                )
            rise = row["ours"]["p99_ms"] - row["ours_nojournal"]["p99_ms"]
            targets.append(
                {
                    "target": f"p99 rise with the journal <= 2 ms at {at}",
                    "value": rise,
                    "met": rise <= 2,
                }
            )
        if "baseline" in row and "ours" in row:
            ratio = row["ours"]["cpu_ms_per_turn"] / row["baseline"]["cpu_ms_per_turn"]
            targets.append(
                {
                    "target": f"CPU per turn <= 1.03x the build before at {at}",
                    "value": ratio,
                    "met": ratio <= 1.03,
                }
            )
        if "ours_tito" in row and "ours" in row:
            # Reported, not a target: it includes the tokenizer's encode of the appended
            # text (TITO's own share is bench_tito.py's target).
            extra = row["ours_tito"]["cpu_ms_per_turn"] - row["ours"]["cpu_ms_per_turn"]
            res.setdefault("tito_extra_cpu_ms_per_turn", {})[c] = extra
            print(f"TITO's extra CPU per turn at {at}, the encode included: {extra:.3f} ms")
        if "baseline_tito" in row and "ours_tito" in row:
            ratio = row["ours_tito"]["cpu_ms_per_turn"] / row["baseline_tito"]["cpu_ms_per_turn"]
            targets.append(
                {
                    "target": f"CPU per TITO turn <= 1.03x the build before at {at}",
                    "value": ratio,
                    "met": ratio <= 1.03,
                }
            )
    for c, row in res["throughput"].items():
        if "chat_tools" in row and "anthropic" in row:
            at = f"c={c}" if c.isdigit() else f"{c.removeprefix('rate')} sessions/s"
            ratio = row["anthropic"]["cpu_ms_per_turn"] / row["chat_tools"]["cpu_ms_per_turn"]
            targets.append(
                {
                    "target": f"Anthropic CPU per turn <= 1.15x chat at {at}",
                    "value": ratio,
                    "met": ratio <= 1.15,
                }
            )
    if "equal_trajectories" in res:
        targets.append(
            {
                "target": "Anthropic and chat sessions record equal trajectories",
                "value": float(res["equal_trajectories"]),
                "met": res["equal_trajectories"] and min(res["kept_turns"].values()) == a.turns,
            }
        )
    mem = res.get("memory", {})
    if "ours" in mem and "baseline" in mem:
        ratio = mem["ours"]["bytes_per_session"] / mem["baseline"]["bytes_per_session"]
        targets.append(
            {
                "target": "RSS per kept session <= 1.03x the build before",
                "value": ratio,
                "met": ratio <= 1.03,
            }
        )
    memory_limits = {"ours": 150 * 1024, "ours_nojournal": 400 * 1024}
    for name, limit in memory_limits.items():
        if name in res.get("memory", {}):
            per = res["memory"][name]["bytes_per_session"]
            targets.append(
                {
                    "target": f"{name}: RSS per kept session <= {limit // 1024} KiB",
                    "value": per / 1024,
                    "met": per <= limit,
                }
            )
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
