"""Registry benchmarks: our Cython registry against the production-PR reference.

Everything compares the two *in the same run* (the machine is shared and
noisy, so only same-run ratios mean much).

Two entry points over the same operation code:

    # ops/s with pytest-benchmark (ours and reference side by side)
    .venv/bin/python -m pytest benchmarks/bench_registry.py --benchmark-only \
        --benchmark-group-by=param:op

    # the full report: ops/s, memory, auto-create scaling, growth pauses;
    # prints tables, checks the targets, writes JSON
    .venv/bin/python benchmarks/bench_registry.py --json benchmarks/results/registry.json

Memory is measured in a fresh subprocess per figure: the reference with
tracemalloc (it is pure Python), ours with the RSS delta of the process,
because the Cython registry's C allocations are invisible to tracemalloc.
Growth pauses run in a fresh subprocess per shard count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import rollout_sessions.testing.reference_registry as ref  # noqa: E402

OURS_DEFAULT_CAPACITY = 1 << 20  # the server's default TOMBSTONE_CAPACITY
OURS_DEFAULT_SHARDS = 64
FAR_TTL = 7200.0  # production TTL: nothing goes stale during a benchmark


# --- the two implementations behind one face ---------------------------------


@dataclass(frozen=True)
class Impl:
    name: str
    make: Callable[..., Any]  # (capacity: int | None, shards: int | None) -> registry
    DELETED: Any
    NEVER_SEEN: Any
    session_type: Any


def _ours() -> Impl:
    from rollout_sessions.registry import DELETED, NEVER_SEEN, Registry
    from rollout_sessions.sessions.session import Session

    def make(capacity: int | None = None, shards: int | None = None) -> Any:
        return Registry(
            shards=shards or OURS_DEFAULT_SHARDS,
            tombstone_capacity=capacity or OURS_DEFAULT_CAPACITY,
            retry_window=60.0,
            ttl=FAR_TTL,
        )

    return Impl("ours", make, DELETED, NEVER_SEEN, Session)


def _reference() -> Impl:
    def make(capacity: int | None = None, shards: int | None = None) -> Any:
        return ref.ReferenceRegistry(
            tombstone_capacity=capacity or ref.PRODUCTION_TOMBSTONE_CAPACITY, ttl=FAR_TTL
        )

    return Impl("reference", make, ref.DELETED, ref.NEVER_SEEN, ref.ProductionLikeSession)


IMPLS: dict[str, Callable[[], Impl]] = {"ours": _ours, "reference": _reference}


def foreign_ids(n: int) -> list[str]:
    """Client-supplied 32-hex ids: the kind only a tombstone can refuse."""
    rnd = os.urandom(16 * n).hex()
    return [rnd[i : i + 32] for i in range(0, 32 * n, 32)]


def as_request_ids(ids: list[str]) -> list[str]:
    """Fresh ``str`` objects equal to ``ids``, as a server parses them from a path.

    A string that was hashed once caches its hash, which makes dict and set
    probes of the *same* object far cheaper than a server ever sees: each
    request brings a new string. Every timed probe uses fresh copies.
    """
    return [sid.encode().decode() for sid in ids]


# --- operations (one place, used by pytest-benchmark and the report) --------
# Each ``setup_*`` builds the state an operation needs and returns the
# argument tuple; each ``run_*`` performs n operations and returns n.

SHARED = object()  # the session object for pure registry-cost figures


def setup_mint(impl: Impl, n: int) -> tuple:
    return (impl.make(), n)


def run_mint(reg: Any, n: int) -> int:
    mint = reg.mint
    obj = SHARED
    for _ in range(n):
        mint(obj)
    return n


def setup_lookup(impl: Impl, n: int) -> tuple:
    reg = impl.make()
    ids = [reg.mint(SHARED) for _ in range(n)]
    ids.reverse()  # not insertion order
    return (reg, as_request_ids(ids))


def run_lookup(reg: Any, ids: list[str]) -> int:
    lookup = reg.lookup
    for sid in ids:
        lookup(sid)
    return len(ids)


def setup_delete_minted(impl: Impl, n: int) -> tuple:
    reg = impl.make()
    return (reg, as_request_ids([reg.mint(SHARED) for _ in range(n)]))


def setup_delete_foreign(impl: Impl, n: int) -> tuple:
    reg = impl.make()
    ids = foreign_ids(n)
    for sid in ids:
        reg.create(sid, SHARED)
    return (reg, as_request_ids(ids))


def run_remove(reg: Any, ids: list[str]) -> int:
    remove = reg.remove
    for sid in ids:
        remove(sid)
    return len(ids)


def _deleted_setup(impl: Impl, n: int, minted: bool) -> tuple:
    reg, ids = (setup_delete_minted if minted else setup_delete_foreign)(impl, n)
    run_remove(reg, ids)
    # Only the most recent deletes are remembered by the production ring:
    # query those (cycled up to n), so both registries answer DELETED.
    keep = ids[-min(len(ids), ref.PRODUCTION_TOMBSTONE_CAPACITY) :]
    probe = as_request_ids((keep * (n // len(keep) + 1))[:n])
    assert reg.lookup(probe[0]) is impl.DELETED and reg.lookup(probe[-1]) is impl.DELETED
    return (reg, probe)


def setup_deleted_minted(impl: Impl, n: int) -> tuple:
    return _deleted_setup(impl, n, minted=True)


def setup_deleted_foreign(impl: Impl, n: int) -> tuple:
    return _deleted_setup(impl, n, minted=False)


OPS: dict[str, tuple[Callable[..., tuple], Callable[..., int]]] = {
    "mint": (setup_mint, run_mint),
    "lookup_live": (setup_lookup, run_lookup),
    "delete_tombstone_minted": (setup_delete_minted, run_remove),
    "delete_tombstone_foreign": (setup_delete_foreign, run_remove),
    "deleted_check_minted": (setup_deleted_minted, run_lookup),
    "deleted_check_foreign": (setup_deleted_foreign, run_lookup),
}


def time_once(run: Callable[..., int], args: tuple) -> tuple[int, float]:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        n = run(*args)
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    return n, dt


def bench_ops(impls: list[Impl], n: int, rounds: int) -> dict[str, dict[str, Any]]:
    """ops/s per (op, impl); rounds interleave the impls so both share the noise."""
    out: dict[str, dict[str, Any]] = {}
    for op, (setup, run) in OPS.items():
        rates: dict[str, list[float]] = {i.name: [] for i in impls}
        for _ in range(rounds):
            for impl in impls:
                args = setup(impl, n)
                count, dt = time_once(run, args)
                rates[impl.name].append(count / dt)
                del args
        out[op] = {
            name: {"best_ops_s": max(r), "median_ops_s": statistics.median(r), "rounds": len(r)}
            for name, r in rates.items()
        }
    return out


# --- memory (each figure in a fresh subprocess) ------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _fresh_ids(n: int):
    """Ids made one at a time, as requests bring them (no list held aside)."""
    urandom = os.urandom
    for _ in range(n):
        yield urandom(16).hex()


def _mem_tombstone(impl_name: str, n: int, method: str) -> dict[str, Any]:
    """Bytes per remembered foreign delete, registry holding ``n`` of them."""
    impl = IMPLS[impl_name]()
    gc.collect()
    if method == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    else:
        base = _rss()
    reg = impl.make(capacity=n)
    for sid in _fresh_ids(n):  # the tombstone keeps the only reference to each id
        reg.create(sid, SHARED)
        reg.remove(sid)
    gc.collect()
    if method == "tracemalloc":
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    else:
        used = _rss() - base
    st = reg.stats()
    assert st["tombstones"] == n, st
    out = {"entries": n, "method": method, "bytes": used, "bytes_per_entry": used / n}
    if "tombstone_bytes" in st:  # ours: exact accounting of the C allocations
        out["accounted_bytes_per_entry"] = st["tombstone_bytes"] / n
        if method == "tracemalloc":
            out["python_bytes_per_entry"] = used / n
            out["bytes_per_entry"] = (used + st["tombstone_bytes"]) / n
            out["method"] = "tracemalloc (Python) + stats()['tombstone_bytes'] (C)"
    return out


def _mem_session(impl_name: str, n: int, session: str, method: str) -> dict[str, Any]:
    """Bytes per idle minted session: registry entry plus the session object."""
    impl = IMPLS[impl_name]()
    if session == "project":
        from rollout_sessions.sessions.session import Session as factory
    else:
        factory = ref.ProductionLikeSession
    reg = impl.make(capacity=1024)  # tombstone ring not part of this figure
    gc.collect()
    if method == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    else:
        base = _rss()
    table0 = reg.stats().get("table_bytes", 0)
    for _ in range(n):
        reg.mint(factory())
    gc.collect()
    if method == "tracemalloc":
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    else:
        used = _rss() - base
    st = reg.stats()
    assert st["live"] == n
    out = {
        "sessions": n,
        "session_type": factory.__name__,
        "method": method,
        "bytes": used,
        "bytes_per_session": used / n,
    }
    if "table_bytes" in st and method == "tracemalloc":
        # ours: tracemalloc sees only the Python objects; add the C table exactly.
        c_bytes = st["table_bytes"] - table0
        out["python_bytes_per_session"] = used / n
        out["c_table_bytes_per_session"] = c_bytes / n
        out["bytes_per_session"] = (used + c_bytes) / n
        out["method"] = "tracemalloc (Python objects) + stats()['table_bytes'] (C table)"
    return out


def _subprocess_json(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(impls: list[Impl], n_tomb: int, n_sess: int) -> dict[str, Any]:
    """Reference: tracemalloc (pure Python). Ours: exact accounting and RSS delta."""
    out: dict[str, Any] = {"tombstone": {}, "idle_session": {}}
    for impl in impls:
        methods = ["tracemalloc"] if impl.name == "reference" else ["tracemalloc", "rss"]
        sessions = ["project"] + (["production_like"] if impl.name == "reference" else [])
        for m in methods:
            key = impl.name if m == "tracemalloc" else f"{impl.name}/rss"
            out["tombstone"][key] = _subprocess_json(["_mem_tombstone", impl.name, str(n_tomb), m])
            for sess in sessions:
                k = key if sess == "project" else f"{key}/{sess}"
                out["idle_session"][k] = _subprocess_json(
                    ["_mem_session", impl.name, str(n_sess), sess, m]
                )
    return out


# --- auto-create cost against live-session count ----------------------------


def _fill_auto_created(impl: Impl, live: int) -> Any:
    reg = impl.make()
    ids = foreign_ids(live)
    factory = impl.session_type
    if isinstance(reg, ref.ReferenceRegistry):
        reg.bulk_load_auto_created(ids, factory)  # same state, without N scans
    else:
        goc = reg.get_or_create
        for sid in ids:
            goc(sid, factory)
    assert reg.stats()["live"] == live
    return reg


def bench_autocreate(
    impls: list[Impl], sizes: list[int], max_ops: int, budget_s: float
) -> dict[str, Any]:
    """Mean cost of one auto-create of a never-seen id with ``size`` live sessions."""
    out: dict[str, Any] = {}
    for impl in impls:
        out[impl.name] = {}
        for live in sizes:
            reg = _fill_auto_created(impl, live)
            fresh = foreign_ids(max_ops)
            goc = reg.get_or_create
            factory = impl.session_type
            gc.collect()
            gc.disable()
            done = 0
            t0 = time.perf_counter()
            deadline = t0 + budget_s
            # Chunks of 64 so the budget check costs nothing measurable.
            while done < max_ops:
                for sid in fresh[done : done + 64]:
                    goc(sid, factory)
                done = min(done + 64, max_ops)
                if time.perf_counter() > deadline:
                    break
            dt = time.perf_counter() - t0
            gc.enable()
            out[impl.name][str(live)] = {"ops": done, "us_per_op": dt / done * 1e6}
            del reg, fresh
            gc.collect()
    return out


# --- growth pauses ------------------------------------------------------------


def _growth(impl_name: str, shards: int, size: int) -> dict[str, Any]:
    import numpy as np

    impl = IMPLS[impl_name]()
    reg = impl.make(shards=shards)
    mint = reg.mint
    obj = SHARED
    ns = time.perf_counter_ns
    lat = array("q", bytes(8 * size))
    gc.collect()
    gc.disable()  # a Python GC pass is not a registry pause
    t_start = time.perf_counter()
    for i in range(size):
        t0 = ns()
        mint(obj)
        lat[i] = ns() - t0
    elapsed = time.perf_counter() - t_start
    a = np.frombuffer(lat, dtype=np.int64)
    top = np.sort(np.partition(a, size - 5)[size - 5 :])[::-1] if size >= 5 else np.sort(a)[::-1]
    worst = int(np.argmax(a))
    return {
        "impl": impl_name,
        "shards": shards,
        "entries": size,
        "max_us": float(a.max()) / 1e3,
        "max_at_entry": worst,
        "top5_us": [float(x) / 1e3 for x in top],
        "p99_99_us": float(np.percentile(a, 99.99)) / 1e3,
        "p99_9_us": float(np.percentile(a, 99.9)) / 1e3,
        "p50_us": float(np.percentile(a, 50)) / 1e3,
        "elapsed_s": elapsed,
    }


def bench_growth(shard_counts: list[int], size: int, reference: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in shard_counts:
        out[f"ours/{s}"] = _subprocess_json(["_growth", "ours", str(s), str(size)])
    if reference:
        out["reference/dict"] = _subprocess_json(["_growth", "reference", "1", str(size)])
    return out


# --- report -----------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ops = res.get("ops")
    if ops and "ours" in ops["mint"] and "reference" in ops["mint"]:
        for op in (
            "delete_tombstone_foreign",
            "delete_tombstone_minted",
            "deleted_check_foreign",
            "deleted_check_minted",
        ):
            r = ops[op]["ours"]["best_ops_s"] / ops[op]["reference"]["best_ops_s"]
            rows.append({"target": f"{op} ours/ref >= 1", "value": r, "met": r >= 1.0})
    mem = res.get("memory")
    if mem and {"ours", "reference"} <= mem["tombstone"].keys():
        # Ours: the larger of exact accounting and the RSS delta (conservative).
        o = max(
            mem["tombstone"]["ours"]["bytes_per_entry"],
            mem["tombstone"].get("ours/rss", {}).get("bytes_per_entry", 0.0),
        )
        r = mem["tombstone"]["reference"]["bytes_per_entry"]
        rows.append(
            {"target": "tombstone bytes ours/ref <= 1/3", "value": o / r, "met": o <= r / 3}
        )
    ac = res.get("autocreate")
    if ac and "ours" in ac:
        sizes = sorted(ac["ours"], key=int)
        if len(sizes) >= 2:
            lo, hi = ac["ours"][sizes[0]]["us_per_op"], ac["ours"][sizes[-1]]["us_per_op"]
            rows.append(
                {
                    "target": f"ours auto-create at {sizes[-1]} / at {sizes[0]} <= 1.5",
                    "value": hi / lo,
                    "met": hi / lo <= 1.5,
                }
            )
    gr = res.get("growth")
    if gr and "ours/1" in gr and "ours/64" in gr:
        r = gr["ours/64"]["max_us"] / gr["ours/1"]["max_us"]
        rows.append(
            {
                "target": "worst growth pause 64 shards / 1 shard <= 1/20",
                "value": r,
                "met": r <= 1 / 20,
            }
        )
    return rows


def print_report(res: dict[str, Any]) -> None:
    if "ops" in res:
        print(f"\n== ops/s (best of {res['params']['rounds']} rounds, n={res['params']['n']}) ==")
        print(f"{'op':28} {'ours':>14} {'reference':>14} {'ours/ref':>9}")
        for op, d in res["ops"].items():
            o = d.get("ours", {}).get("best_ops_s")
            r = d.get("reference", {}).get("best_ops_s")
            ratio = f"{o / r:9.2f}" if o and r else " " * 9
            print(f"{op:28} {_fmt(o) if o else '-':>14} {_fmt(r) if r else '-':>14} {ratio}")
    if "memory" in res:
        m = res["memory"]
        print("\n== memory ==")
        for name, d in m["tombstone"].items():
            extra = d.get("accounted_bytes_per_entry")
            extra = f", accounted {extra:.1f}" if extra is not None else ""
            print(
                f"tombstone  {name:34} {d['bytes_per_entry']:8.1f} B/entry "
                f"({d['entries']:,} entries, {d['method']}{extra})"
            )
        for name, d in m["idle_session"].items():
            print(
                f"idle sess  {name:34} {d['bytes_per_session']:8.1f} B/session "
                f"({d['sessions']:,} x {d['session_type']}, {d['method']})"
            )
    if "autocreate" in res:
        print("\n== auto-create of a never-seen id (us/op) by live sessions ==")
        for name, d in res["autocreate"].items():
            cells = "  ".join(
                f"{k:>9} live: {v['us_per_op']:10.2f} ({v['ops']} ops)" for k, v in d.items()
            )
            print(f"{name:10} {cells}")
    if "growth" in res:
        print("\n== single-insert latency while growing (us) ==")
        print(
            f"{'impl/shards':16} {'entries':>11} {'max':>10} {'p99.99':>8} {'p99.9':>7} "
            f"{'p50':>6} {'top5':>40}"
        )
        for k, d in res["growth"].items():
            top = ",".join(f"{x:.0f}" for x in d["top5_us"])
            print(
                f"{k:16} {d['entries']:>11,} {d['max_us']:>10.1f} {d['p99_99_us']:>8.2f} "
                f"{d['p99_9_us']:>7.2f} {d['p50_us']:>6.2f} {top:>40}"
            )
    rows = targets(res)
    if rows:
        print("\n== targets ==")
        for t in rows:
            print(f"{'MET ' if t['met'] else 'MISS'}  {t['target']:50} {t['value']:.3f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Internal subprocess entry points (fresh interpreter per memory figure).
    if argv and argv[0] == "_mem_tombstone":
        print(json.dumps(_mem_tombstone(argv[1], int(argv[2]), argv[3])))
        return 0
    if argv and argv[0] == "_mem_session":
        print(json.dumps(_mem_session(argv[1], int(argv[2]), argv[3], argv[4])))
        return 0
    if argv and argv[0] == "_growth":
        print(json.dumps(_growth(argv[1], int(argv[2]), int(argv[3]))))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--impl",
        action="append",
        choices=sorted(IMPLS),
        help="implementations to run (default: both)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=["ops", "memory", "autocreate", "growth"],
        help="sections to run (default: all)",
    )
    p.add_argument("--n", type=int, default=200_000, help="operations per ops/s round")
    p.add_argument("--rounds", type=int, default=5, help="ops/s rounds per implementation")
    p.add_argument("--mem-tombstones", type=int, default=1_000_000)
    p.add_argument("--mem-sessions", type=int, default=1_000_000)
    p.add_argument(
        "--autocreate-sizes", default="10000,1000000", help="comma list of live-session counts"
    )
    p.add_argument(
        "--autocreate-ops", type=int, default=20_000, help="max auto-creates timed per size"
    )
    p.add_argument(
        "--autocreate-budget-s",
        type=float,
        default=2.0,
        help="stop timing a size after this long (the reference is O(live))",
    )
    p.add_argument("--growth-size", type=int, default=10_000_000)
    p.add_argument("--growth-shards", default="1,64,256")
    p.add_argument(
        "--growth-reference",
        action="store_true",
        help="also time the reference dict growing (context only)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes for a smoke run (numbers not meaningful)"
    )
    p.add_argument("--json", type=Path, help="write results here")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.rounds, a.mem_tombstones, a.mem_sessions = 20_000, 2, 50_000, 50_000
        a.autocreate_sizes, a.autocreate_ops, a.autocreate_budget_s = "1000,20000", 500, 0.3
        a.growth_size = 200_000

    impls = [IMPLS[name]() for name in (a.impl or ["ours", "reference"])]
    sections = a.only or ["ops", "memory", "autocreate", "growth"]
    res: dict[str, Any] = {
        "params": vars(a) | {"json": str(a.json) if a.json else None},
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    if "ops" in sections:
        res["ops"] = bench_ops(impls, a.n, a.rounds)
    if "memory" in sections:
        res["memory"] = bench_memory(impls, a.mem_tombstones, a.mem_sessions)
    if "autocreate" in sections:
        sizes = [int(x) for x in a.autocreate_sizes.split(",")]
        res["autocreate"] = bench_autocreate(impls, sizes, a.autocreate_ops, a.autocreate_budget_s)
    if "growth" in sections and any(i.name == "ours" for i in impls):
        shards = [int(x) for x in a.growth_shards.split(",")]
        res["growth"] = bench_growth(shards, a.growth_size, a.growth_reference)
    res["targets"] = targets(res)
    print_report(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {a.json}")
    return 0


# --- pytest-benchmark face (same operations) ----------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script path needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    PYTEST_N = 50_000

    @pytest.fixture(params=sorted(IMPLS))
    def impl(request: Any) -> Impl:
        try:
            return IMPLS[request.param]()
        except ImportError as e:
            pytest.skip(f"{request.param} not importable: {e}")

    @pytest.mark.parametrize("op", list(OPS))
    def test_registry_op(benchmark: Any, impl: Impl, op: str) -> None:
        setup, run = OPS[op]
        benchmark.group = op
        benchmark.extra_info["ops_per_round"] = PYTEST_N
        benchmark.pedantic(run, setup=lambda: (setup(impl, PYTEST_N), {}), rounds=5, iterations=1)
        ops_s = PYTEST_N / benchmark.stats.stats.min
        benchmark.extra_info["best_ops_s"] = ops_s


if __name__ == "__main__":
    sys.exit(main())
