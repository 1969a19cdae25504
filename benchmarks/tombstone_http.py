"""The tombstone study over HTTP, against live servers (imported by tombstone_capacity.py).

Real time replaces the manual clock, so the retry window is scaled down
(default 5 s) and only the sizes that fit in minutes are run. The same
client code drives our server and the FastAPI reference, in one run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import uvloop
from benchutil import ours_argv, reference_argv, started
from httpload import HttpClient, chat_turn, create_session, delete_session, get_session

from rollout_sessions.testing.client import first_messages


async def _fan_out(
    url: str,
    items: Sequence[str],
    concurrency: int,
    op: Callable[[HttpClient, str], Awaitable[int]],
) -> tuple[list[int], float]:
    """Runs ``op`` over ``items`` on ``concurrency`` keep-alive clients; statuses and seconds."""
    statuses = [0] * len(items)
    cursor = 0

    async def worker(client: HttpClient) -> None:
        nonlocal cursor
        while cursor < len(items):
            i = cursor
            cursor += 1
            statuses[i] = await op(client, items[i])
        await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(HttpClient.for_url(url)) for _ in range(concurrency)))
    return statuses, time.perf_counter() - t0


async def _create(client: HttpClient, sid: str) -> int:
    status, _ = await create_session(client, sid)
    return status


async def _chat(client: HttpClient, sid: str) -> int:
    status, _ = await chat_turn(client, sid, first_messages(0))
    return status


async def _get(client: HttpClient, sid: str) -> int:
    status, _ = await get_session(client, sid)
    return status


@dataclass
class HttpRun:
    size: int
    capacity: int
    kind: str
    retries: int
    resurrections: int
    refused: int


async def _rollout_step(url: str, size: int, kind: str, window: float, concurrency: int) -> HttpRun:
    if kind == "minted":
        holder: list[str] = []

        async def mint(client: HttpClient, _: str) -> int:
            status, sid = await create_session(client)
            holder.append(sid)
            return status

        await _fan_out(url, [""] * size, concurrency, mint)
        ids = holder
    else:
        ids = [f"rollout-{i}" for i in range(size)]
        await _fan_out(url, ids, concurrency, _create)
    await _fan_out(url, ids, concurrency, _chat)
    # The harness deletes the whole step in a burst; each id's stale retry is
    # due a random delay after its own delete, within the retry window.
    rng = random.Random(size)
    due: list[tuple[float, str]] = []
    loop = asyncio.get_running_loop()

    async def delete(client: HttpClient, sid: str) -> int:
        status = await delete_session(client, sid)
        due.append((loop.time() + rng.uniform(0, window), sid))
        return status

    await _fan_out(url, ids, concurrency, delete)
    due.sort()
    pending = [sid for _, sid in due]
    times = {sid: t for t, sid in due}

    async def retry(client: HttpClient, sid: str) -> int:
        delay = times[sid] - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return await _chat(client, sid)

    statuses, _ = await _fan_out(url, pending, concurrency * 4, retry)
    ghosts = sum(s == 200 for s in statuses)
    return HttpRun(size, 0, kind, len(statuses), ghosts, sum(s == 404 for s in statuses))


def resurrections_over_http(
    sizes: Sequence[int], capacities: Sequence[int], window: float, concurrency: int
) -> list[HttpRun]:
    runs = []
    for size in sizes:
        for cap in capacities:
            for kind in ("foreign", "minted"):
                extra = ("--tombstone-capacity", str(cap), "--retry-window-s", str(window))
                argv = ours_argv()
                with started("ours", lambda port, a=argv, e=extra: [*a(port), *e]) as url:
                    run = uvloop.run(_rollout_step(url, size, kind, window, concurrency))
                run.capacity = cap
                runs.append(run)
                print(
                    f"{size:>10,} {cap:>11,} {kind:>8} {run.retries:>9,} "
                    f"{run.resurrections:>8,} {run.refused:>9,}",
                    flush=True,
                )
    return runs


async def _delete_costs(url: str, n: int, concurrency: int) -> dict[str, float]:
    ids = [f"cost-{i}" for i in range(n)]
    statuses, _ = await _fan_out(url, ids, concurrency, _create)
    assert all(s == 200 for s in statuses), "create by id failed"

    async def delete(client: HttpClient, sid: str) -> int:
        return await delete_session(client, sid)

    statuses, t_del = await _fan_out(url, ids, concurrency, delete)
    assert all(s == 204 for s in statuses), "delete failed"
    statuses, t_get = await _fan_out(url, ids, concurrency, _get)
    kept = sum(s == 404 for s in statuses)
    return {"deletes_per_s": n / t_del, "deleted_gets_per_s": n / t_get, "still_refused": kept}


def delete_costs_over_http(
    capacities: Sequence[int], n: int, concurrency: int
) -> list[dict[str, float]]:
    """Deletes/s and deleted-id GETs/s: ours per capacity, and the reference, one run."""
    rows = []
    servers = [("reference (deque 10k)", 10_000, lambda port: reference_argv(port))]
    for cap in capacities:
        extra = ("--tombstone-capacity", str(cap))
        servers.append(
            (f"ours, capacity {cap:,}", cap, lambda port, e=extra: [*ours_argv()(port), *e])
        )
    for name, cap, argv in servers:
        with started(name, argv) as url:
            row = uvloop.run(_delete_costs(url, n, concurrency))
        row.update(server=name, capacity=cap)
        rows.append(row)
        print(
            f"{name:>26} {row['deletes_per_s']:>12,.0f} {row['deleted_gets_per_s']:>14,.0f} "
            f"{row['still_refused']:>9,}",
            flush=True,
        )
    return rows
