"""The cluster on realistic turns: CPU per turn in HAProxy and in each instance,
a scaling model from those figures, and N=2 against N=1 on this machine.

Targets, all forwarding to one realistic backend, all running through the
whole benchmark (an idle one costs nothing), rounds alternating their order:

- ``alone``: one ``serve`` (journal on, the default), no balancer;
- ``cluster1`` / ``cluster2``: ``rollout-sessions cluster --instances 1|2``;
- ``reference``: the FastAPI reference, for scale.

For each, per round: turns/s, p50/p99 of a turn, and CPU per turn of every
process tree (HAProxy, each instance, the cluster's supervisor).

Then one ``serve`` alone again, open loop at the turns/s each instance of
N=2 served: how much more a turn costs an instance at that lower load.

The model: an instance costs ``c_i`` ms of CPU per turn, HAProxy ``c_b``. With
N instances on C cores (N <= C; backend and clients elsewhere),
``turns/s = min(N / c_i, C / (c_i + c_b))``, and the scaling against one
instance alone (``c_1``) is ``turns/s * c_1``; for N = C it is
``N * c_1 / (c_i + c_b)``. Twice: with ``c_i`` and ``c_b`` as measured for
N=2 (on this machine each instance then runs at about half the load of one
alone, which costs more per turn: fewer events per loop pass, smaller group
commits), and with those of N=1 (one instance at full load behind HAProxy),
the regime of a saturated cluster on C cores.

    .venv/bin/python benchmarks/bench_cluster.py
    .venv/bin/python benchmarks/bench_cluster.py --concurrency 64 --duration 10 --rounds 3

Targets: HAProxy's CPU per turn at most 15% of an instance's; modelled
scaling at least 0.85 x N up to 16 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_realistic import OPEN_LOOP_CAP, backend_argv, cpu_seconds, load_args  # noqa: E402
from benchutil import (  # noqa: E402
    RESULTS,
    finish,
    median,
    ours_argv,
    reference_argv,
    run_loadgen,
    started_process,
)

from rollout_sessions.testing.processes import ManagedProcess, free_port_range  # noqa: E402


@contextlib.contextmanager
def started_cluster(n: int, upstream: str) -> Iterator[dict[str, Any]]:
    """A cluster of n instances; yields its URL and process handles by role."""
    port = free_port_range(n + 1)  # the balancer, then the instances
    base = port + 1
    workdir = tempfile.mkdtemp(prefix="rollout-sessions-bench-cluster-")
    argv = [sys.executable, "-m", "rollout_sessions", "cluster", "--instances", str(n)]
    argv += ["--port", str(port), "--base-port", str(base), "--upstream", upstream]
    argv += ["--log-level", "warning"]
    proc = ManagedProcess(argv, port, cwd=workdir)
    state_path = Path(workdir) / "rollout-sessions-cluster" / "cluster.json"
    try:
        deadline = time.monotonic() + 120
        while not state_path.exists():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"cluster {n} did not start:\n{proc.log()[-4000:]}")
            time.sleep(0.1)
        state = json.loads(state_path.read_text())
        yield {
            "url": proc.url,
            "parts": {
                "haproxy": psutil.Process(state["balancer"]["pid"]),
                **{
                    f"instance{k}": psutil.Process(i["pid"])
                    for k, i in enumerate(state["instances"])
                },
                "supervisor": psutil.Process(proc.pid),
            },
        }
    finally:
        proc.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def own_cpu(proc: psutil.Process) -> float:
    """The supervisor alone (its children are measured as parts of their own)."""
    t = proc.cpu_times()
    return t.user + t.system


def one_round(target: dict[str, Any], a: argparse.Namespace, rate: float = 0.0) -> dict[str, Any]:
    """One round: ``a.concurrency`` clients, or open loop at ``rate`` sessions/s."""
    parts: dict[str, psutil.Process] = target["parts"]
    measure = {name: (own_cpu if name == "supervisor" else cpu_seconds) for name in parts}
    before = {name: measure[name](p) for name, p in parts.items()}
    if rate:
        extra = ("--rate", f"{rate:.3f}")
        out = run_loadgen(*load_args(target["url"], a, OPEN_LOOP_CAP, a.duration, *extra))
    else:
        out = run_loadgen(*load_args(target["url"], a, a.concurrency, a.duration))
    turns = max(1, out["units"])
    cpu = {name: (measure[name](p) - before[name]) * 1000 / turns for name, p in parts.items()}
    lat = out["latency_ms"].get("turn", {})
    return {
        "turns": out["units"],
        "turns_per_s": out["units_per_s"],
        "p50_ms": lat.get("p50", float("nan")),
        "p99_ms": lat.get("p99", float("nan")),
        "cpu_ms_per_turn": cpu,
        "errors": out["errors"],
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    parts = rounds[0]["cpu_ms_per_turn"].keys()
    return {
        "turns_per_s": median([r["turns_per_s"] for r in rounds]),
        "p50_ms": median([r["p50_ms"] for r in rounds]),
        "p99_ms": median([r["p99_ms"] for r in rounds]),
        "cpu_ms_per_turn": {p: median([r["cpu_ms_per_turn"][p] for r in rounds]) for p in parts},
        "errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
    }


def model(c_1: float, c_i: float, c_b: float, cores: list[int]) -> list[dict[str, float]]:
    rows = []
    for c in cores:
        n = c
        turns = min(n / c_i, c / (c_i + c_b)) * 1000
        rows.append(
            {"cores": c, "instances": n, "turns_per_s": turns, "scaling": turns * c_1 / 1000}
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--completion-words", type=int, default=800)
    p.add_argument("--json", type=Path, default=RESULTS / "cluster.json")
    a = p.parse_args()

    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(started_process("backend", backend_argv(a.completion_words)))
        assert backend is not None
        up = backend.url
        alone = stack.enter_context(started_process("alone", ours_argv(up)))
        reference = stack.enter_context(
            started_process("reference", lambda port: reference_argv(port, up))
        )
        assert alone is not None and reference is not None
        targets = {
            "alone": {"url": alone.url, "parts": {"server": psutil.Process(alone.pid)}},
            "cluster1": stack.enter_context(started_cluster(1, up)),
            "cluster2": stack.enter_context(started_cluster(2, up)),
            "reference": {"url": reference.url, "parts": {"server": psutil.Process(reference.pid)}},
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for r in range(a.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                runs[name].append(one_round(targets[name], a))
                last = runs[name][-1]
                cpu = "  ".join(f"{k} {v:.3f}" for k, v in last["cpu_ms_per_turn"].items())
                print(
                    f"round {r} {name:9} {last['turns_per_s']:7.1f} turns/s  "
                    f"p50 {last['p50_ms']:7.1f}  p99 {last['p99_ms']:7.1f} ms  "
                    f"CPU ms/turn: {cpu}  errors {last['errors']}",
                    flush=True,
                )
        # One instance alone at the load each instance of N=2 had (open loop):
        # what an instance costs per turn at that load, without a second one.
        half = median([r["turns_per_s"] for r in runs["cluster2"]]) / 2 / a.turns
        runs["alone_half"] = []
        for r in range(a.rounds):
            runs["alone_half"].append(one_round(targets["alone"], a, rate=half))
            last = runs["alone_half"][-1]
            print(
                f"round {r} alone at {half:.1f} sessions/s: {last['turns_per_s']:.1f} turns/s  "
                f"CPU ms/turn: {last['cpu_ms_per_turn']['server']:.3f}",
                flush=True,
            )
    res: dict[str, Any] = {"params": vars(a) | {"json": str(a.json)}}
    res["runs"] = {name: summarize(rs) for name, rs in runs.items()}
    t = res["runs"]
    c_1 = t["alone"]["cpu_ms_per_turn"]["server"]
    c2 = t["cluster2"]["cpu_ms_per_turn"]
    # Each turn is served by one instance: per turn served, an instance costs the sum.
    c_i = c2["instance0"] + c2["instance1"]
    c_b = c2["haproxy"]
    # The N=2 instances each ran at about half the load of one alone, and an
    # instance costs more per turn at a lower load (alone_half shows how
    # much); a saturated cluster on C cores runs every instance at full
    # load, as the instance of N=1 behind HAProxy.
    c_half = t["alone_half"]["cpu_ms_per_turn"]["server"]
    c_full = t["cluster1"]["cpu_ms_per_turn"]["instance0"]
    c_b_full = t["cluster1"]["cpu_ms_per_turn"]["haproxy"]
    res["inputs"] = {"c_1": c_1, "c_i": c_i, "c_b": c_b, "c_b_over_c_i": c_b / c_i}
    res["inputs"] |= {"c_1_at_n2_rate": c_half, "c_i_full_load": c_full, "c_b_full_load": c_b_full}
    res["model"] = model(c_1, c_i, c_b, [1, 2, 4, 8, 16])
    res["model_full_load"] = model(c_1, c_full, c_b_full, [1, 2, 4, 8, 16])
    print(
        f"\ninputs: alone {c_1:.3f} ms/turn; N=2 instances {c_i:.3f}; HAProxy {c_b:.3f} "
        f"({c_b / c_i:.1%} of an instance's)\n"
        f"one alone at the turns/s of an N=2 instance (open loop): {c_half:.3f} ms/turn\n"
        f"at full load (N=1): instance {c_full:.3f}, HAProxy {c_b_full:.3f} "
        f"({c_b_full / c_full:.1%} of it)"
    )
    for label, rows in (("as measured", res["model"]), ("at full load", res["model_full_load"])):
        for row in rows:
            print(
                f"model {label}: {row['cores']:2} cores, {row['instances']:2} instances: "
                f"{row['turns_per_s']:8.0f} turns/s = {row['scaling']:.2f} x one instance "
                f"({row['scaling'] / row['instances']:.2f} N)"
            )
    ratio = t["cluster2"]["turns_per_s"] / t["cluster1"]["turns_per_s"]
    print(f"measured here (2 cores, shared with backend and clients): N=2/N=1 = {ratio:.2f}")
    res["measured_n2_over_n1"] = ratio
    targets = []
    for label, c, b, rows in (
        ("N=2 as measured", c_i, c_b, res["model"]),
        ("at full load, N=1", c_full, c_b_full, res["model_full_load"]),
    ):
        worst = min(row["scaling"] / row["instances"] for row in rows)
        targets += [
            {
                "target": f"HAProxy CPU per turn <= 15% of an instance's ({label})",
                "value": b / c,
                "met": b / c <= 0.15,
            },
            {
                "target": f"modelled scaling >= 0.85 x N up to 16 cores ({label})",
                "value": worst,
                "met": worst >= 0.85,
            },
        ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
