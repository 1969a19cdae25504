"""Restart with the journal: how long until a killed server serves again, and disk use.

A ``serve`` (journal on) forwarding to the realistic backend is filled with
``--idle`` sessions created by id and never used, and ``--busy`` sessions of
8 realistic turns kept (``loadgen.py realistic --keep``). Then ``kill -9``,
the same command again on the same ``DATA_DIR``, and the time from the new
process's start to its first ``/health`` 200 (it answers only once the
journal is replayed); its log shows the replay's progress. Then every kept
session is read back and compared with what it was before the kill.

Disk use: the journal's files (database + WAL) after the fill, against the
raw bytes of what ``GET /sessions/{id}`` returns for every session.

    .venv/bin/python benchmarks/bench_restart.py
    .venv/bin/python benchmarks/bench_restart.py --idle 100000 --busy 1000

Targets: serving within 10 s of the restart; disk at most 1.5x the records' bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_realistic import backend_argv, load_args  # noqa: E402
from benchutil import RESULTS, finish, run_loadgen, started_process  # noqa: E402

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv  # noqa: E402


async def create_idle(url: str, n: int, concurrency: int = 64) -> None:
    async with aiohttp.ClientSession() as http:
        queue = iter(range(n))

        async def worker() -> None:
            for k in queue:
                async with http.post(f"{url}/sessions", json={"session_id": f"idle-{k}"}) as r:
                    assert r.status == 200, await r.text()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def read_all(url: str, ids: list[str], concurrency: int = 32) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as http:
        queue = iter(ids)

        async def worker() -> None:
            for sid in queue:
                async with http.get(f"{url}/sessions/{sid}") as r:
                    out[sid] = await r.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def disk_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("journal.sqlite*"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--idle", type=int, default=100_000)
    p.add_argument("--busy", type=int, default=1000)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--completion-words", type=int, default=800)
    p.add_argument("--json", type=Path, default=RESULTS / "restart.json")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rollout-sessions-bench-restart-"))
    data_dir = workdir / "data"
    ids_file = workdir / "kept-ids.txt"
    with started_process("backend", backend_argv(a.completion_words)) as backend:
        assert backend is not None
        port = free_port()
        argv = serve_argv(port, "--upstream", backend.url, "--data-dir", str(data_dir))
        server = ManagedProcess(argv, port, cwd=workdir)
        server.wait_healthy(timeout=60)
        t = time.monotonic()
        asyncio.run(create_idle(server.url, a.idle))
        print(f"{a.idle} idle sessions created in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        out = run_loadgen(
            *load_args(server.url, a, 32, 3600, "--keep", "--sessions", str(a.busy)),
            "--ids-out",
            str(ids_file),
        )
        print(f"{out['units']} turns in {time.monotonic() - t:.1f} s ({a.busy} kept sessions)")
        ids = ids_file.read_text().split()
        before = asyncio.run(read_all(server.url, ids))
        record_bytes = sum(len(v) for v in before.values())
        record_bytes += a.idle * len(b'{"session_id":"idle-00000","records":[],"metadata":{}}')
        disk = disk_bytes(data_dir)
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait()
        server.cleanup()
        began = time.monotonic()
        again = ManagedProcess(argv, port, cwd=workdir)
        again.wait_healthy(timeout=600)
        serving_s = time.monotonic() - began
        after = asyncio.run(read_all(again.url, ids))
        progress = [ln for ln in again.log().splitlines() if "restor" in ln or "journal" in ln]
        again.cleanup()
    same = sum(1 for sid in ids if after.get(sid) == before[sid])
    print(f"restart: serving {serving_s:.2f} s after the new process started")
    print("\n".join(progress[-6:]))
    print(f"{same}/{len(ids)} kept sessions read back identical")
    print(
        f"disk {disk / 2**20:.1f} MiB for {record_bytes / 2**20:.1f} MiB of records: "
        f"{disk / record_bytes:.2f}x"
    )
    res = {
        "params": {k: str(v) for k, v in vars(a).items()},
        "serving_s": serving_s,
        "identical": same,
        "kept": len(ids),
        "disk_bytes": disk,
        "record_bytes": record_bytes,
        "log": progress,
    }
    targets = [
        {
            "target": "serving within 10 s of the restart",
            "value": serving_s,
            "met": serving_s <= 10,
        },
        {
            "target": "kept sessions identical after the restart",
            "value": same,
            "met": same == len(ids),
        },
        {
            "target": "disk <= 1.5x the records' bytes",
            "value": disk / record_bytes,
            "met": disk <= 1.5 * record_bytes,
        },
    ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
