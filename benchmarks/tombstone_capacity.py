"""At which rollout sizes is a 10k tombstone too small, and what does enough cost?

Simulates rollout steps of B x N sessions against the registry in-process on
a manual clock: every session is created, given its turns, deleted in a
burst as the harness finishes, and stale retries at the deleted ids arrive
over the retry window (uniform or exponential delays). A retry that finds
its id forgotten auto-creates a ghost session: a resurrection. Counted per
tombstone capacity, separately for self-minted ids and for foreign ids
(client-supplied, or minted before a restart), which only the ring protects.

Then, per capacity: resident memory of a full ring, delete+tombstone and
deleted-id lookup throughput, and the horizon reached at several delete
rates. Writes benchmarks/results/tombstone_capacity.json and
benchmarks/plots/tombstone_capacity.png.

    python benchmarks/tombstone_capacity.py            # full run (a few minutes)
    python benchmarks/tombstone_capacity.py --quick    # small sizes only
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from rollout_sessions.registry import DELETED, Registry, tombstone_bytes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SIZES = [10_000, 64_000, 256_000, 1_000_000]
CAPACITIES = [10_000, 100_000, 1_000_000, 10_000_000]
RATES = [1_000, 10_000, 100_000, 1_000_000]
# Measuring a horizon means turning the ring over at each rate; past 1M
# entries that costs minutes and the horizon is capacity / rate anyway.
HORIZON_CAPACITIES = [10_000, 100_000, 1_000_000]


@dataclass
class Run:
    size: int  # B x N sessions per step
    capacity: int
    kind: str  # "minted" or "foreign"
    steps: int
    retries: int
    resurrections: int
    refused: int
    young_overwrites: int
    horizon_s: float


def delays(rng: random.Random, n: int, window: float, dist: str) -> list[float]:
    if dist == "uniform":
        return [rng.uniform(0.0, window) for _ in range(n)]
    # Exponential with mean window/4, cut at the window: most retries come early.
    return [min(rng.expovariate(4.0 / window), window) for _ in range(n)]


def simulate(
    size: int,
    capacity: int,
    kind: str,
    *,
    steps: int,
    step_s: float,
    burst_s: float,
    window: float,
    dist: str,
    retry_fraction: float,
    turns: int,
    seed: int,
) -> Run:
    """Events in time order on the registry's manual clock."""
    reg = Registry(shards=64, tombstone_capacity=capacity, retry_window=window, manual_clock=True)
    rng = random.Random(seed)
    events: list[tuple[float, int, str]] = []  # (time, 0 delete | 1 retry, id)
    for step in range(steps):
        start = step * step_s
        if kind == "minted":
            ids = [reg.mint(object()) for _ in range(size)]
        else:
            ids = [f"rollout-{step}-{i}" for i in range(size)]
            for sid in ids:
                reg.create(sid, object())
        for _ in range(turns):
            for sid in ids:
                reg.lookup(sid)
        burst_start = start + step_s - burst_s
        delete_times = [burst_start + burst_s * i / size for i in range(size)]
        events.extend((t, 0, sid) for t, sid in zip(delete_times, ids, strict=True))
        retried = [i for i in range(size) if rng.random() < retry_fraction]
        for i, d in zip(retried, delays(rng, len(retried), window, dist), strict=True):
            events.append((delete_times[i] + d, 1, ids[i]))
        # Sessions of the next step exist before this step's burst ends; the
        # clock only moves forward, so step creation happens at its start.
    events.sort(key=lambda e: (e[0], e[1]))
    resurrections = refused = retries = 0
    now = 0.0
    for t, what, sid in events:
        if t > now:
            reg.advance(t - now)
            now = t
        if what == 0:
            reg.remove(sid)
            continue
        retries += 1
        # A stale chat turn: get-or-create. Anything but DELETED is a ghost.
        if reg.get_or_create(sid, object) is DELETED:
            refused += 1
        else:
            resurrections += 1  # the ghost stays live: nobody will delete it
    stats = reg.stats()
    return Run(
        size,
        capacity,
        kind,
        steps,
        retries,
        resurrections,
        refused,
        stats["young_overwrites"],
        stats["horizon_s"],
    )


@dataclass
class Cost:
    capacity: int
    allocated_bytes: int
    rss_bytes_full: int  # resident growth with the ring full
    delete_per_s: float  # delete + tombstone of a live foreign id, ring full
    deleted_lookup_per_s: float  # lookups answering DELETED


def measure_cost(capacity: int, sample: int = 300_000) -> Cost:
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    reg = Registry(shards=64, tombstone_capacity=capacity)
    fill = [f"fill-{i}" for i in range(capacity)]
    for sid in fill:
        reg.create(sid, None)
        reg.remove(sid)
    del fill
    gc.collect()
    rss = proc.memory_info().rss - before
    names = [f"timed-{i}" for i in range(sample)]
    for sid in names:
        reg.create(sid, None)
    t0 = time.perf_counter()
    for sid in names:
        reg.remove(sid)  # delete + tombstone, overwriting the oldest entry
    t1 = time.perf_counter()
    probe = names[-min(sample, capacity) :]
    random.Random(1).shuffle(probe)
    t2 = time.perf_counter()
    for sid in probe:
        reg.lookup(sid)
    t3 = time.perf_counter()
    return Cost(
        capacity,
        tombstone_bytes(capacity),
        rss,
        sample / (t1 - t0),
        len(probe) / (t3 - t2),
    )


def measure_horizon(capacity: int, rate: float, window: float) -> dict[str, float]:
    """Sustained foreign deletes at ``rate``/s until the ring has turned over."""
    reg = Registry(shards=64, tombstone_capacity=capacity, retry_window=window, manual_clock=True)
    step = 1.0 / rate
    for i in range(capacity + capacity // 5):
        sid = f"h{i}"
        reg.create(sid, None)
        reg.remove(sid)
        reg.advance(step)
    stats = reg.stats()
    return {
        "capacity": capacity,
        "rate": rate,
        "horizon_s": stats["horizon_s"],
        "young_overwrites": stats["young_overwrites"],
    }


def plot(runs: list[Run], horizons: list[dict], window: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    caps = sorted({r.capacity for r in runs} | {h["capacity"] for h in horizons})
    color = {cap: f"C{i}" for i, cap in enumerate(caps)}  # one colour per capacity, both panels
    for cap in caps:
        for kind, style in (("foreign", "-o"), ("minted", ":x")):
            pts = sorted(
                (r.size, r.resurrections) for r in runs if r.capacity == cap and r.kind == kind
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ys = [max(y, 0.8) for y in ys]
                left.plot(xs, ys, style, color=color[cap], label=f"{kind}, capacity {cap:,}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_ylim(bottom=0.5)
    left.set_xlabel("sessions deleted per step (B x N)")
    left.set_ylabel("resurrections (0 drawn at 0.8; every minted line is 0)")
    left.set_title("Stale retries that created a ghost session")
    left.legend(fontsize=7)
    for cap in sorted({h["capacity"] for h in horizons}):
        pts = sorted((h["rate"], h["horizon_s"]) for h in horizons if h["capacity"] == cap)
        xs, ys = zip(*pts, strict=True)
        right.plot(xs, ys, "-o", color=color[cap], label=f"capacity {cap:,}")
    right.axhline(window, color="red", linestyle=":", label=f"retry window {window:g} s")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("foreign deletes per second")
    right.set_ylabel("horizon: age of oldest remembered delete (s)")
    right.set_title("How far back 'delete sticks' reaches")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--capacities", type=int, nargs="+", default=CAPACITIES)
    parser.add_argument("--rates", type=float, nargs="+", default=RATES)
    parser.add_argument("--horizon-capacities", type=int, nargs="+", default=HORIZON_CAPACITIES)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=120.0, help="seconds per rollout step")
    parser.add_argument("--burst-s", type=float, default=5.0, help="seconds the delete burst lasts")
    parser.add_argument("--retry-window", type=float, default=60.0)
    parser.add_argument("--delays", choices=["uniform", "exponential"], default="uniform")
    parser.add_argument("--retry-fraction", type=float, default=1.0)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="sizes <= 64k, capacities <= 100k")
    parser.add_argument("--http", action="store_true", help="also run against live servers")
    parser.add_argument("--http-sizes", type=int, nargs="+", default=[10_000, 64_000])
    parser.add_argument("--http-capacities", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--http-cost-capacities", type=int, nargs="+", default=[10_000, 1 << 20])
    parser.add_argument("--http-window", type=float, default=5.0, help="scaled retry window (s)")
    parser.add_argument("--http-deletes", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "tombstone_capacity.json")
    parser.add_argument("--plot", type=Path, default=HERE / "plots" / "tombstone_capacity.png")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 64_000]
        args.capacities = [c for c in args.capacities if c <= 100_000]
        args.rates = [r for r in args.rates if r <= 100_000]
        args.horizon_capacities = [c for c in args.horizon_capacities if c <= 100_000]

    runs: list[Run] = []
    print(f"{'B x N':>10} {'capacity':>11} {'ids':>8} {'retries':>9} {'ghosts':>8} {'young ow':>9}")
    for size in args.sizes:
        for cap in args.capacities:
            for kind in ("foreign", "minted"):
                run = simulate(
                    size,
                    cap,
                    kind,
                    steps=args.steps,
                    step_s=args.step_s,
                    burst_s=args.burst_s,
                    window=args.retry_window,
                    dist=args.delays,
                    retry_fraction=args.retry_fraction,
                    turns=args.turns,
                    seed=size ^ cap,
                )
                runs.append(run)
                print(
                    f"{size:>10,} {cap:>11,} {kind:>8} {run.retries:>9,} "
                    f"{run.resurrections:>8,} {run.young_overwrites:>9,}",
                    flush=True,
                )

    print(
        f"\n{'capacity':>11} {'alloc MiB':>10} {'RSS MiB':>9} {'B/entry':>8} "
        f"{'delete/s':>11} {'dead lookup/s':>14}"
    )
    costs = []
    # Each capacity in a fresh process: RSS growth in this one would be hidden
    # by memory the simulations above freed and the allocator reuses.
    spawn = multiprocessing.get_context("spawn")
    for cap in args.capacities:
        with spawn.Pool(1) as pool:
            cost = pool.apply(measure_cost, (cap,))
        costs.append(cost)
        print(
            f"{cap:>11,} {cost.allocated_bytes / 2**20:>10.1f} {cost.rss_bytes_full / 2**20:>9.1f} "
            f"{cost.rss_bytes_full / cap:>8.1f} {cost.delete_per_s:>11,.0f} "
            f"{cost.deleted_lookup_per_s:>14,.0f}",
            flush=True,
        )

    horizons = []
    print(f"\n{'capacity':>11} {'deletes/s':>10} {'horizon s':>10}")
    for cap in args.horizon_capacities:
        for rate in args.rates:
            h = measure_horizon(cap, rate, args.retry_window)
            horizons.append(h)
            print(f"{cap:>11,} {rate:>10,.0f} {h['horizon_s']:>10.2f}", flush=True)

    http: dict = {}
    if args.http:
        from tombstone_http import delete_costs_over_http, resurrections_over_http

        print(f"\nover HTTP, retry window {args.http_window:g} s (scaled)")
        print(f"{'B x N':>10} {'capacity':>11} {'ids':>8} {'retries':>9} {'ghosts':>8} {'404':>9}")
        http_runs = resurrections_over_http(
            args.http_sizes, args.http_capacities, args.http_window, args.concurrency
        )
        print(f"\n{'server':>26} {'deletes/s':>12} {'deleted GET/s':>14} {'refused':>9}")
        http = {
            "runs": [asdict(r) for r in http_runs],
            "delete_costs": delete_costs_over_http(
                args.http_cost_capacities, args.http_deletes, args.concurrency
            ),
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "runs": [asdict(r) for r in runs],
                "costs": [asdict(c) for c in costs],
                "horizons": horizons,
                "http": http,
            },
            indent=1,
        )
    )
    if not args.no_plot:
        plot(runs, horizons, args.retry_window, args.plot)
    print(f"\nwrote {args.out}" + ("" if args.no_plot else f" and {args.plot}"))


if __name__ == "__main__":
    main()
