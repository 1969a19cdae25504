"""Write-ahead journal store: stdlib ``sqlite3`` (WAL) against LMDB, measured on our workload.

The journal's workload, per chat turn of a rollout session: one "turn" record
(~1 KiB small fields, a ~3 KiB token suffix, a ~6 KiB zstd blob; keyed by
(16-byte session key, turn index)) plus 2-4 "message" rows of 2-5 KiB (keyed by
(session key, position)); per session one ~100-byte create row at the start and
one delete of all its rows at the end; sessions last 8 turns. Writes are group
committed: one writer thread commits each queued batch in one transaction and
then wakes the batch's waiters. Payloads are random bytes (the blob is already
compressed; neither store compresses).

Layout, the same in both stores: ``sessions`` (key -> create row), ``turns``
(key, k -> small fields), ``turn_data`` (key, k -> tokens, blob) and
``messages`` (key, pos -> body). Small fields live apart from the blobs so a
restart reads only them. SQLite: WITHOUT ROWID tables with PRIMARY KEY (key, k),
``auto_vacuum=INCREMENTAL``, WAL (default autocheckpoint, 1000 pages),
``secure_delete=OFF`` (Debian builds default it on), 4 KiB pages, a 32 MiB page
cache, ``executemany`` per table inside one BEGIN/COMMIT per batch. SQLite
advises WITHOUT ROWID only for rows under ~1/20 of a page, so one more
configuration, ``sqlite-normal-rowid``, makes the two big-row tables
(``turn_data``, ``messages``) rowid tables. LMDB: named sub-databases, keys
``key || be32(k)``, ``Cursor.putmulti`` per sub-database in one write
transaction, map_size 64 GiB (the file grows as used; no writemap).

Stores and durability settings, and what each loses:

* ``sqlite-normal`` (WAL, ``synchronous=NORMAL``): the WAL is fsynced only at
  checkpoints. Process kill: nothing. Power loss / OS crash: the commits since
  the last WAL sync roll back; the database stays consistent.
* ``sqlite-normal-rowid``: as ``sqlite-normal``, rowid tables for big rows.
* ``sqlite-full`` (WAL, ``synchronous=FULL``): the WAL is fsynced at every
  commit. Loses nothing on either.
* ``lmdb-sync`` (``sync=True``, default): data pages fdatasynced, then the meta
  page written synchronously, at every commit. Loses nothing on either.
* ``lmdb-nosync`` (``sync=False, metasync=False``): pages are written to the
  file at commit but never flushed. Process kill: nothing (the kernel has the
  writes). Power loss / OS crash: recent commits are lost *and* the file can be
  corrupt (the meta page may reach the disk before the pages it points to, and
  pages freed later may already be overwritten); LMDB documents this. (Its
  middle ground, ``metasync=False`` alone, still syncs once per commit and
  loses at most the last commit.)

Measured in one run, the configurations in alternating order, repeated
``--reps`` times (3) with medians reported (each metric's median on its own):

1. sustained turn writes at batch sizes 1, 16, 64, 256 turns per commit:
   turns/s and process CPU per turn (getrusage user+sys, all threads; kernel
   writeback threads are not counted), and, per turn, the bytes handed to write
   syscalls and the number of read+write syscalls (``/proc/self/io``). The
   stream round-robins over a steady set of live sessions (``--live``) with
   creates and deletes mixed in as the sessions start and end, after an untimed
   warm-up of one full cycle;
2. commit latency p50/p99 per batch at batch size 64 (same cells): the time of the
   transaction in the writer thread, from BEGIN to the end of COMMIT;
3. session deletes (all rows of a session) per second, 64 per commit;
4. disk usage: write ``--disk-sessions`` sessions x 8 turns (interleaved, 64
   turns per commit), delete a random half, reclaim (SQLite:
   ``PRAGMA incremental_vacuum``, one execute per free page because Python's
   ``sqlite3`` runs only its first step, + ``wal_checkpoint(TRUNCATE)``; LMDB cannot
   shrink its file, so nothing, plus the size a compacting ``env.copy`` would
   give), then write as many new sessions again (is freed space reused?).
   SQLite sizes are taken after ``wal_checkpoint(TRUNCATE)``; all sizes count
   every file of the store. "Raw" is payload bytes plus a 20-byte key per row;
   also the time of a GET (all turn blobs of one session, warm cache);
5. restart/load: a store with ``--load-singles`` sessions of 1 turn and
   ``--load-multis`` sessions of 8 turns (with messages) is populated once per
   store (non-durable setting, 256 turns per commit: the file format does not
   depend on it); then, per repeat, open and read all sessions' small fields
   (create rows and turn small fields, not blobs or messages) into a dict,
   cold (files evicted from the page cache with fsync + POSIX_FADV_DONTNEED;
   the hypervisor may still cache) and warm.

Temporary stores live under /tmp and are deleted afterwards. Commands (from the
repository root; ``lmdb`` is a benchmark-only dependency)::

    .venv/bin/pip install -q lmdb
    .venv/bin/python benchmarks/bench_journal_store.py --quick   # ~1 min
    .venv/bin/python benchmarks/bench_journal_store.py           # full, < 10 min

Prints markdown tables; writes ``benchmarks/results/journal_store.json``
(``journal_store_quick.json`` with ``--quick``; ``--json`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import random
import resource
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import lmdb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

KEY_LEN = 16
ROW_KEY_LEN = KEY_LEN + 4
TURNS_PER_SESSION = 8
BATCH_SIZES = (1, 16, 64, 256)
LATENCY_BATCH = 64
DELETE_BATCH = 64
POPULATE_BATCH = 256
MB = 1 << 20
LMDB_MAP_SIZE = 64 << 30
SQLITE_CACHE_KIB = 32 << 10
BE32 = struct.Struct(">I")

# ---------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Create:
    key: bytes
    meta: bytes


@dataclass(frozen=True, slots=True)
class Turn:
    key: bytes
    k: int
    meta: bytes
    tokens: bytes
    blob: bytes
    messages: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


Op = Create | Turn | Delete


class Payloads:
    """Pools of random payloads; ops pick from them (content does not matter to the stores)."""

    POOL = 64

    def __init__(self, rng: random.Random) -> None:
        self.create = self._pool(rng, 80, 120)
        self.meta = self._pool(rng, 900, 1150)
        self.tokens = self._pool(rng, 2560, 3584)
        self.blob = self._pool(rng, 5632, 6656)
        self.message = self._pool(rng, 2048, 5120)

    def _pool(self, rng: random.Random, lo: int, hi: int) -> list[bytes]:
        return [rng.randbytes(rng.randint(lo, hi)) for _ in range(self.POOL)]


def op_raw_bytes(op: Op) -> int:
    """Payload bytes plus one key per row written."""
    if isinstance(op, Create):
        return KEY_LEN + len(op.meta)
    if isinstance(op, Turn):
        messages = sum(ROW_KEY_LEN + len(body) for _, body in op.messages)
        return 2 * ROW_KEY_LEN + len(op.meta) + len(op.tokens) + len(op.blob) + messages
    return 0


@dataclass(slots=True)
class Session:
    key: bytes
    length: int = TURNS_PER_SESSION
    turns: int = 0
    next_pos: int = 0
    raw: int = 0

    def next_ops(self, pay: Payloads, rng: random.Random) -> list[Op]:
        """The ops of this session's next turn (its create row first on turn 0)."""
        ops: list[Op] = []
        if self.turns == 0:
            ops.append(Create(self.key, rng.choice(pay.create)))
        n_messages = rng.randint(2, 4)
        messages = tuple((self.next_pos + i, rng.choice(pay.message)) for i in range(n_messages))
        self.next_pos += n_messages
        meta, tokens, blob = rng.choice(pay.meta), rng.choice(pay.tokens), rng.choice(pay.blob)
        ops.append(Turn(self.key, self.turns, meta, tokens, blob, messages))
        self.turns += 1
        self.raw += sum(op_raw_bytes(op) for op in ops)
        return ops


class SessionStream:
    """Turns round-robin over ``live`` sessions; a session that ends is deleted and replaced.

    First lifetimes are staggered (1..8 turns) so that creates and deletes arrive
    evenly from the start."""

    def __init__(self, pay: Payloads, rng: random.Random, live: int) -> None:
        self.pay, self.rng = pay, rng
        self.sessions = [
            Session(rng.randbytes(KEY_LEN), length=1 + i % TURNS_PER_SESSION) for i in range(live)
        ]
        self.i = 0
        self.raw = 0

    def next_turn(self) -> list[Op]:
        session = self.sessions[self.i]
        before = session.raw
        ops = session.next_ops(self.pay, self.rng)
        self.raw += session.raw - before
        if session.turns == session.length:
            ops.append(Delete(session.key))
            self.sessions[self.i] = Session(self.rng.randbytes(KEY_LEN))
        self.i = (self.i + 1) % len(self.sessions)
        return ops

    def batch(self, n_turns: int) -> list[Op]:
        ops: list[Op] = []
        for _ in range(n_turns):
            ops.extend(self.next_turn())
        return ops


def interleaved_turns(
    sessions: Sequence[Session], n_turns: int, pay: Payloads, rng: random.Random
) -> Iterator[list[Op]]:
    """Turn 0 of every session, then turn 1 of every session, ...: one op list per turn."""
    for _ in range(n_turns):
        for session in sessions:
            yield session.next_ops(pay, rng)


def batched(turns: Iterable[list[Op]], size: int) -> Iterator[list[Op]]:
    """Group per-turn op lists into batches of ``size`` turns."""
    batch: list[Op] = []
    count = 0
    for ops in turns:
        batch.extend(ops)
        count += 1
        if count == size:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


@dataclass(slots=True)
class Rows:
    sessions: list[tuple[bytes, bytes]] = field(default_factory=list)
    turns: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    turn_data: list[tuple[bytes, int, bytes, bytes]] = field(default_factory=list)
    messages: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)


def split_rows(ops: Sequence[Op]) -> Rows:
    """Rows per table. Deletes are applied after the batch's writes: keys are never reused."""
    rows = Rows()
    for op in ops:
        if isinstance(op, Turn):
            rows.turns.append((op.key, op.k, op.meta))
            rows.turn_data.append((op.key, op.k, op.tokens, op.blob))
            rows.messages.extend((op.key, pos, body) for pos, body in op.messages)
        elif isinstance(op, Create):
            rows.sessions.append((op.key, op.meta))
        else:
            rows.deletes.append(op.key)
    return rows


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

SmallState = dict[bytes, tuple[bytes, list[bytes]]]


class Store(Protocol):
    def commit(self, ops: Sequence[Op]) -> None: ...
    def get_blobs(self, key: bytes) -> list[tuple[bytes, bytes]]: ...
    def load_small(self) -> SmallState: ...
    def settle(self) -> None: ...
    def reclaim(self) -> None: ...
    def space(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


SQLITE_TABLES = ("sessions", "turns", "turn_data", "messages")
SQLITE_COLUMNS = {
    "sessions": "key BLOB PRIMARY KEY, meta BLOB NOT NULL",
    "turns": "key BLOB NOT NULL, k INTEGER NOT NULL, meta BLOB NOT NULL, PRIMARY KEY (key, k)",
    "turn_data": "key BLOB NOT NULL, k INTEGER NOT NULL, tokens BLOB NOT NULL,"
    " blob BLOB NOT NULL, PRIMARY KEY (key, k)",
    "messages": "key BLOB NOT NULL, k INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (key, k)",
}
BIG_ROW_TABLES = ("turn_data", "messages")


def sqlite_schema(rowid_big_rows: bool) -> list[str]:
    """WITHOUT ROWID tables; with ``rowid_big_rows`` the two big-row tables are rowid
    tables instead (their PRIMARY KEY becomes a separate index), as SQLite advises for
    rows larger than ~1/20 of a page."""
    statements = []
    for table, columns in SQLITE_COLUMNS.items():
        suffix = "" if rowid_big_rows and table in BIG_ROW_TABLES else " WITHOUT ROWID"
        statements.append(f"CREATE TABLE IF NOT EXISTS {table} ({columns}){suffix}")
    return statements


class SqliteStore:
    def __init__(self, path: Path, synchronous: str, rowid_big_rows: bool = False) -> None:
        self.path = path
        self.conn = sqlite3.connect(
            path / "journal.db", isolation_level=None, check_same_thread=False
        )
        # auto_vacuum must precede the first write (journal_mode=WAL writes page 1).
        # secure_delete is on by default in Debian's build: it zeroes every freed page,
        # which LMDB does not do either.
        for pragma in (
            "auto_vacuum=INCREMENTAL",
            "journal_mode=WAL",
            f"synchronous={synchronous}",
            "secure_delete=OFF",
            f"cache_size=-{SQLITE_CACHE_KIB}",
            f"journal_size_limit={64 * MB}",
        ):
            self.conn.execute(f"PRAGMA {pragma}").fetchall()
        for statement in sqlite_schema(rowid_big_rows):
            self.conn.execute(statement)
        assert self.pragma("auto_vacuum") == 2, "auto_vacuum=INCREMENTAL did not take"

    def pragma(self, name: str) -> Any:
        return self.conn.execute(f"PRAGMA {name}").fetchone()[0]

    def commit(self, ops: Sequence[Op]) -> None:
        rows = split_rows(ops)
        conn = self.conn
        conn.execute("BEGIN")
        try:
            if rows.sessions:
                conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?)", rows.sessions)
            if rows.turns:
                conn.executemany("INSERT OR REPLACE INTO turns VALUES (?, ?, ?)", rows.turns)
                conn.executemany(
                    "INSERT OR REPLACE INTO turn_data VALUES (?, ?, ?, ?)", rows.turn_data
                )
            if rows.messages:
                conn.executemany("INSERT OR REPLACE INTO messages VALUES (?, ?, ?)", rows.messages)
            if rows.deletes:
                params = [(key,) for key in rows.deletes]
                for table in SQLITE_TABLES:
                    conn.executemany(f"DELETE FROM {table} WHERE key = ?", params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def get_blobs(self, key: bytes) -> list[tuple[bytes, bytes]]:
        sql = "SELECT tokens, blob FROM turn_data WHERE key = ? ORDER BY k"
        return self.conn.execute(sql, (key,)).fetchall()

    def load_small(self) -> SmallState:
        state: SmallState = {}
        for key, meta in self.conn.execute("SELECT key, meta FROM sessions"):
            state[key] = (meta, [])
        for key, _k, meta in self.conn.execute("SELECT key, k, meta FROM turns"):
            state[key][1].append(meta)
        return state

    def settle(self) -> None:
        busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0, "checkpoint blocked"

    def reclaim(self) -> None:
        """Give every free page back to the OS. Python's sqlite3 runs one step of
        ``PRAGMA incremental_vacuum`` per execute (the pragma reports no columns, so
        the module stops after the first step), and each step frees one page: loop.
        (``executescript``, i.e. sqlite3_exec, also runs it to the end.)"""
        pages = self.pragma("freelist_count")
        self.conn.execute("BEGIN")
        for _ in range(pages):
            self.conn.execute("PRAGMA incremental_vacuum")
        self.conn.execute("COMMIT")
        assert self.pragma("freelist_count") == 0
        self.settle()

    def space(self) -> dict[str, int]:
        page = self.pragma("page_size")
        free = self.pragma("freelist_count") * page
        total = self.pragma("page_count") * page
        return {"file": dir_bytes(self.path), "in_use": total - free, "free": free}

    def close(self) -> None:
        self.conn.close()


LMDB_DBS = (b"sessions", b"turns", b"turn_data", b"messages")


def row_key(key: bytes, k: int) -> bytes:
    return key + BE32.pack(k)


class LmdbStore:
    def __init__(self, path: Path, sync: bool) -> None:
        self.path = path
        self.env = lmdb.open(str(path), map_size=LMDB_MAP_SIZE, max_dbs=8, sync=sync, metasync=sync)
        self.dbs = {name: self.env.open_db(name) for name in LMDB_DBS}

    def commit(self, ops: Sequence[Op]) -> None:
        rows = split_rows(ops)
        dbs = self.dbs
        with self.env.begin(write=True) as txn:
            if rows.sessions:
                txn.cursor(dbs[b"sessions"]).putmulti(rows.sessions)
            if rows.turns:
                turns = [(row_key(key, k), meta) for key, k, meta in rows.turns]
                txn.cursor(dbs[b"turns"]).putmulti(turns)
                data = [
                    (row_key(key, k), b"".join((BE32.pack(len(tokens)), tokens, blob)))
                    for key, k, tokens, blob in rows.turn_data
                ]
                txn.cursor(dbs[b"turn_data"]).putmulti(data)
            if rows.messages:
                messages = [(row_key(key, pos), body) for key, pos, body in rows.messages]
                txn.cursor(dbs[b"messages"]).putmulti(messages)
            for key in rows.deletes:
                self._delete(txn, key)

    def _delete(self, txn: lmdb.Transaction, key: bytes) -> None:
        txn.delete(key, db=self.dbs[b"sessions"])
        for name in LMDB_DBS[1:]:
            cursor = txn.cursor(self.dbs[name])
            if not cursor.set_range(key):
                continue
            while cursor.key()[:KEY_LEN] == key and cursor.delete():
                pass

    def get_blobs(self, key: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        with self.env.begin(db=self.dbs[b"turn_data"]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(key):
                for k, value in cursor:
                    if k[:KEY_LEN] != key:
                        break
                    split = 4 + BE32.unpack_from(value)[0]
                    out.append((value[4:split], value[split:]))
        return out

    def load_small(self) -> SmallState:
        state: SmallState = {}
        with self.env.begin() as txn:
            for key, meta in txn.cursor(self.dbs[b"sessions"]):
                state[key] = (meta, [])
            for key, meta in txn.cursor(self.dbs[b"turns"]):
                state[key[:KEY_LEN]][1].append(meta)
        return state

    def settle(self) -> None:
        pass

    def reclaim(self) -> None:
        pass  # the file never shrinks; freed pages are reused by later writes

    def space(self) -> dict[str, int]:
        stat = self.env.stat()
        page = stat["psize"]
        used = 2 + stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        with self.env.begin() as txn:
            for db in self.dbs.values():
                s = txn.stat(db)
                used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        total = self.env.info()["last_pgno"] + 1
        return {"file": dir_bytes(self.path), "in_use": used * page, "free": (total - used) * page}

    def compact_copy(self, dest: Path) -> int:
        dest.mkdir()
        self.env.copy(str(dest), compact=True)
        return dir_bytes(dest)

    def close(self) -> None:
        self.env.close()


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "sqlite" | "lmdb"
    durable: bool
    on_kill: str
    on_power_loss: str
    rowid_big_rows: bool = False

    def open(self, path: Path) -> SqliteStore | LmdbStore:
        if self.kind == "sqlite":
            sync = "FULL" if self.durable else "NORMAL"
            return SqliteStore(path, sync, self.rowid_big_rows)
        return LmdbStore(path, sync=self.durable)


SQLITE_NORMAL_LOSS = "commits since the last WAL sync (checkpoint); stays consistent"
CONFIGS = (
    Config("sqlite-normal", "sqlite", False, "nothing", SQLITE_NORMAL_LOSS),
    Config("sqlite-full", "sqlite", True, "nothing", "nothing"),
    Config("sqlite-normal-rowid", "sqlite", False, "nothing", SQLITE_NORMAL_LOSS, True),
    Config("lmdb-sync", "lmdb", True, "nothing", "nothing"),
    Config(
        "lmdb-nosync",
        "lmdb",
        False,
        "nothing",
        "recent commits, and the file may be corrupt",
    ),
)

# ---------------------------------------------------------------------------
# Group-commit writer and timing
# ---------------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def io_counters() -> dict[str, int]:
    """This process's I/O counters (Linux; all threads): bytes and calls of read/write syscalls."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {name: int(value) for name, value in (line.split(": ") for line in text.splitlines())}


class Writer:
    """The single writer thread: commits each queued batch in one transaction, then
    wakes that batch's waiters. A batch stands for everything queued at that moment."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: queue.Queue[tuple[Sequence[Op], threading.Event] | None] = queue.Queue(2)
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            ops, done = item
            try:
                start = time.perf_counter()
                self.store.commit(ops)
                self.latencies.append(time.perf_counter() - start)
            except BaseException as exc:  # reported to the submitter
                self.error = exc
            done.set()

    def submit(self, ops: Sequence[Op]) -> threading.Event:
        if self.error is not None:
            raise RuntimeError("writer failed") from self.error
        done = threading.Event()
        self.queue.put((ops, done))
        return done

    def drain(self, last: threading.Event | None) -> None:
        if last is not None:
            last.wait()
        if self.error is not None:
            raise RuntimeError("writer failed") from self.error

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()


@dataclass
class Timed:
    wall: float
    user: float
    sys: float

    @property
    def cpu(self) -> float:
        return self.user + self.sys


class Stopwatch:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.user, self.sys = cpu_seconds()

    def stop(self) -> Timed:
        user, sys_ = cpu_seconds()
        return Timed(time.perf_counter() - self.wall, user - self.user, sys_ - self.sys)


def commit_all(writer: Writer, batches: Iterable[Sequence[Op]]) -> tuple[Timed, int]:
    """Submit every batch (pipelined through the writer's queue); wait for the last."""
    watch, last, count = Stopwatch(), None, 0
    for batch in batches:
        last = writer.submit(batch)
        count += 1
    writer.drain(last)
    return watch.stop(), count


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    live: int
    cell_s: float
    cell_max_s: float
    latency_commits: int
    disk_sessions: int
    load_singles: int
    load_multis: int
    gets: int
    reps: int


def throughput_cell(
    writer: Writer, stream: SessionStream, batch_turns: int, p: Params
) -> dict[str, float]:
    """Sustained writes at one batch size: turns/s, CPU/turn, commit latencies."""
    need = p.latency_commits if batch_turns == LATENCY_BATCH else 1
    writer.latencies.clear()
    io0, raw0, watch, last, commits = io_counters(), stream.raw, Stopwatch(), None, 0
    while True:
        elapsed = time.perf_counter() - watch.wall
        if elapsed >= p.cell_max_s or (elapsed >= p.cell_s and commits >= need):
            break
        last = writer.submit(stream.batch(batch_turns))
        commits += 1
    writer.drain(last)
    timed, turns = watch.stop(), commits * batch_turns
    io = {name: value - io0[name] for name, value in io_counters().items()}
    lat = writer.latencies
    return {
        f"b{batch_turns}_write_kib": io.get("wchar", math.nan) / turns / 1024,
        f"b{batch_turns}_syscalls": (io.get("syscr", math.nan) + io.get("syscw", 0)) / turns,
        f"b{batch_turns}_turns_s": turns / timed.wall,
        f"b{batch_turns}_cpu_us": timed.cpu / turns * 1e6,
        f"b{batch_turns}_sys_us": timed.sys / turns * 1e6,
        f"b{batch_turns}_mb_s": (stream.raw - raw0) / timed.wall / MB,
        f"b{batch_turns}_p50_ms": percentile(lat, 50) * 1e3,
        f"b{batch_turns}_p99_ms": percentile(lat, 99) * 1e3,
        f"b{batch_turns}_commits": commits,
    }


def throughput_phase(store: Store, p: Params, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    stream = SessionStream(Payloads(rng), rng, p.live)
    writer = Writer(store)
    try:
        warmup = (stream.batch(POPULATE_BATCH) for _ in range(p.live * TURNS_PER_SESSION // 256))
        commit_all(writer, warmup)
        out: dict[str, float] = {}
        for size in BATCH_SIZES:
            out |= throughput_cell(writer, stream, size, p)
        return out
    finally:
        writer.stop()


def time_gets(store: Store, keys: Sequence[bytes], n: int, rng: random.Random) -> float:
    picks = [rng.choice(keys) for _ in range(n)]
    start = time.perf_counter()
    for key in picks:
        blobs = store.get_blobs(key)
        assert len(blobs) == TURNS_PER_SESSION
    return (time.perf_counter() - start) / n * 1e6


def space_mb(store: Store, prefix: str) -> dict[str, float]:
    store.settle()
    return {f"{prefix}_{name}_mb": value / MB for name, value in store.space().items()}


def write_sessions(writer: Writer, sessions: Sequence[Session], seed: int) -> None:
    rng = random.Random(seed)
    turns = interleaved_turns(sessions, TURNS_PER_SESSION, Payloads(rng), rng)
    commit_all(writer, batched(turns, LATENCY_BATCH))


def disk_phase(store: Store, p: Params, seed: int, scratch: Path) -> dict[str, float]:
    """Write, delete a random half, reclaim, rewrite; sizes against raw bytes."""
    rng = random.Random(seed)
    sessions = [Session(rng.randbytes(KEY_LEN)) for _ in range(p.disk_sessions)]
    writer = Writer(store)
    try:
        write_sessions(writer, sessions, seed + 1)
        raw_written = sum(s.raw for s in sessions)
        out = {"raw_written_mb": raw_written / MB, **space_mb(store, "written")}
        out["get_us"] = time_gets(store, [s.key for s in sessions], p.gets, rng)
        doomed = rng.sample(sessions, len(sessions) // 2)
        deletes = [Delete(s.key) for s in doomed]
        chunks = (deletes[i : i + DELETE_BATCH] for i in range(0, len(deletes), DELETE_BATCH))
        timed, _ = commit_all(writer, chunks)
        out["deletes_s"] = len(deletes) / timed.wall
        out["delete_cpu_us"] = timed.cpu / len(deletes) * 1e6
        out["raw_live_mb"] = (raw_written - sum(s.raw for s in doomed)) / MB
        out |= space_mb(store, "deleted")
        watch = Stopwatch()
        store.reclaim()
        out["reclaim_s"] = watch.stop().wall
        out |= space_mb(store, "reclaimed")
        out["given_back_mb"] = out["written_file_mb"] - out["reclaimed_file_mb"]
        if isinstance(store, LmdbStore):
            watch = Stopwatch()
            out["compact_copy_mb"] = store.compact_copy(scratch / "compact") / MB
            out["compact_copy_s"] = watch.stop().wall
        fresh = [Session(rng.randbytes(KEY_LEN)) for _ in range(len(doomed))]
        write_sessions(writer, fresh, seed + 2)
        out |= space_mb(store, "rewritten")
        return out
    finally:
        writer.stop()


def run_config(config: Config, p: Params, seed: int, base: Path) -> dict[str, float]:
    """One repeat of phases 1-4 for one configuration, each in a fresh directory."""
    out: dict[str, float] = {}
    for phase in ("throughput", "disk"):
        path = Path(tempfile.mkdtemp(prefix=f"{config.name}-{phase}-", dir=base))
        store = config.open(path)
        try:
            if phase == "throughput":
                out |= throughput_phase(store, p, seed)
            else:
                out |= disk_phase(store, p, seed, base)
        finally:
            store.close()
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(base / "compact", ignore_errors=True)
    return out


def load_turns(p: Params, rng: random.Random, pay: Payloads) -> tuple[Iterator[list[Op]], int, int]:
    singles = [Session(rng.randbytes(KEY_LEN), length=1) for _ in range(p.load_singles)]
    multis = [Session(rng.randbytes(KEY_LEN)) for _ in range(p.load_multis)]

    def turns() -> Iterator[list[Op]]:
        yield from interleaved_turns(singles, 1, pay, rng)
        yield from interleaved_turns(multis, TURNS_PER_SESSION, pay, rng)

    n_turns = p.load_singles + p.load_multis * TURNS_PER_SESSION
    return turns(), p.load_singles + p.load_multis, n_turns


def populate_for_load(config: Config, p: Params, path: Path, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    turns, n_sessions, n_turns = load_turns(p, rng, Payloads(rng))
    store = config.open(path)
    writer = Writer(store)
    try:
        timed, _ = commit_all(writer, batched(turns, POPULATE_BATCH))
        store.settle()
        file_mb = store.space()["file"] / MB
    finally:
        writer.stop()
        store.close()
    return {
        "sessions": n_sessions,
        "turns": n_turns,
        "populate_turns_s": n_turns / timed.wall,
        "file_mb": file_mb,
    }


def evict(path: Path) -> None:
    """Drop the store's files from the page cache (flushed first; no root needed)."""
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_load(config: Config, path: Path, expect: dict[str, float]) -> float:
    start = time.perf_counter()
    store = config.open(path)
    try:
        state = store.load_small()
    finally:
        store.close()
    elapsed = time.perf_counter() - start
    assert len(state) == expect["sessions"], (len(state), expect["sessions"])
    assert sum(len(turns) for _, turns in state.values()) == expect["turns"]
    return elapsed


# ---------------------------------------------------------------------------
# Driver and report
# ---------------------------------------------------------------------------


def medians(reps: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(rep[key] for rep in reps) for key in reps[0]}


def run_store_phases(p: Params, base: Path, seed: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {c.name: [] for c in CONFIGS}
    for rep in range(p.reps):
        order = CONFIGS if rep % 2 == 0 else tuple(reversed(CONFIGS))
        for config in order:
            start = time.perf_counter()
            results[config.name].append(run_config(config, p, seed + rep * 1000, base))
            took = time.perf_counter() - start
            print(f"  rep {rep + 1}/{p.reps} {config.name}: {took:.1f}s", file=sys.stderr)
    return {name: {"median": medians(reps), "reps": reps} for name, reps in results.items()}


LOAD_CONFIGS = ("sqlite-normal", "lmdb-nosync")  # sessions/turns tables are the same in all


def run_load_phase(p: Params, base: Path, seed: int) -> dict[str, Any]:
    """Populate one store per kind (non-durable setting), then cold/warm loads alternating."""
    configs = {c.kind: c for c in CONFIGS if c.name in LOAD_CONFIGS}
    paths = {kind: Path(tempfile.mkdtemp(prefix=f"load-{kind}-", dir=base)) for kind in configs}
    try:
        setup = {k: populate_for_load(c, p, paths[k], seed) for k, c in configs.items()}
        print(f"  load: populated {list(setup)}", file=sys.stderr)
        reps: dict[str, list[dict[str, float]]] = {kind: [] for kind in configs}
        for rep in range(p.reps):
            kinds = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for kind in kinds:
                evict(paths[kind])
                cold = timed_load(configs[kind], paths[kind], setup[kind])
                warm = timed_load(configs[kind], paths[kind], setup[kind])
                reps[kind].append({"cold_load_s": cold, "warm_load_s": warm})
        return {k: {**setup[k], "median": medians(reps[k]), "reps": reps[k]} for k in configs}
    finally:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(stores: dict[str, Any]) -> str:
    header = ["store", *(f"b={b} turns/s (CPU µs/turn)" for b in BATCH_SIZES)]
    header += [
        f"b={LATENCY_BATCH} commit p50 / p99 ms",
        f"b={LATENCY_BATCH} KiB written, r+w calls",
    ]
    rows = []
    for name, result in stores.items():
        m = result["median"]
        cells = [f"{fmt(m[f'b{b}_turns_s'])} ({fmt(m[f'b{b}_cpu_us'])})" for b in BATCH_SIZES]
        lat = f"{fmt(m[f'b{LATENCY_BATCH}_p50_ms'])} / {fmt(m[f'b{LATENCY_BATCH}_p99_ms'])}"
        io = f"{fmt(m[f'b{LATENCY_BATCH}_write_kib'])}, {fmt(m[f'b{LATENCY_BATCH}_syscalls'])}"
        rows.append([name, *cells, lat, io])
    return table(header, rows)


def disk_table(stores: dict[str, Any]) -> str:
    header = [
        "store",
        "deletes/s (CPU µs/delete)",
        "GET µs",
        "raw written MB",
        "after write MB (x raw)",
        "raw live MB",
        "after delete MB",
        "after reclaim MB (reclaim s)",
        "given back MB",
        "after rewrite MB",
    ]
    rows = []
    for name, result in stores.items():
        m = result["median"]
        reclaimed = f"{fmt(m['reclaimed_file_mb'])} ({fmt(m['reclaim_s'])})"
        if "compact_copy_mb" in m:
            reclaimed += f"; compact copy {fmt(m['compact_copy_mb'])}"
        ratio = m["written_file_mb"] / m["raw_written_mb"]
        rows.append(
            [
                name,
                f"{fmt(m['deletes_s'])} ({fmt(m['delete_cpu_us'])})",
                fmt(m["get_us"]),
                fmt(m["raw_written_mb"]),
                f"{fmt(m['written_file_mb'])} ({ratio:.2f}x)",
                fmt(m["raw_live_mb"]),
                f"{fmt(m['deleted_file_mb'])} ({fmt(m['deleted_free_mb'])} free)",
                reclaimed,
                fmt(m["given_back_mb"]),
                fmt(m["rewritten_file_mb"]),
            ]
        )
    return table(header, rows)


def load_table(load: dict[str, Any]) -> str:
    header = ["store", "sessions / turns", "file MB", "populate turns/s", "cold load s", "warm s"]
    rows = []
    for kind, r in load.items():
        m = r["median"]
        rows.append(
            [
                kind,
                f"{r['sessions']:,} / {r['turns']:,}",
                fmt(r["file_mb"]),
                fmt(r["populate_turns_s"]),
                fmt(m["cold_load_s"]),
                fmt(m["warm_load_s"]),
            ]
        )
    return table(header, rows)


def durability_table() -> str:
    rows = [[c.name, c.on_kill, c.on_power_loss] for c in CONFIGS]
    return table(["store", "loses on process kill", "loses on power loss / OS crash"], rows)


def report(result: dict[str, Any]) -> str:
    stores, load = result["stores"], result["load"]
    return "\n\n".join(
        [
            f"### Sustained turn writes (medians of {result['params']['reps']})",
            throughput_table(stores),
            "### Deletes and disk usage",
            disk_table(stores),
            "### Restart: open + read all small fields",
            load_table(load),
            "### Durability",
            durability_table(),
        ]
    )


SIZE_OPTIONS = {
    "live": "live sessions in the sustained-write stream (1024; quick 256)",
    "disk_sessions": "sessions of 8 turns in the disk-usage phase (2000; quick 300)",
    "load_singles": "1-turn sessions in the restart phase (100000; quick 5000)",
    "load_multis": "8-turn sessions in the restart phase (1000; quick 100)",
}


def params_for(args: argparse.Namespace) -> Params:
    if args.quick:
        p = Params(256, 0.3, 1.5, 50, 300, 5_000, 100, 200, args.reps)
    else:
        p = Params(1024, 1.5, 5.0, 300, 2_000, 100_000, 1_000, 1_000, args.reps)
    overrides = {name: getattr(args, name) for name in SIZE_OPTIONS}
    return replace(p, **{name: v for name, v in overrides.items() if v is not None})


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "lmdb": ".".join(map(str, lmdb.version())),
        "py_lmdb": lmdb.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    for name, help_ in SIZE_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=help_)
    args = parser.parse_args(argv)
    p = params_for(args)
    json_path = args.json or RESULTS / (
        "journal_store_quick.json" if args.quick else "journal_store.json"
    )
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bench_journal_", dir="/tmp"))
    try:
        stores = run_store_phases(p, base, args.seed)
        load = run_load_phase(p, base, args.seed)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "params": asdict(p),
        "quick": args.quick,
        "environment": environment(),
        "configs": [asdict(c) for c in CONFIGS],
        "stores": stores,
        "load": load,
        "run_s": time.perf_counter() - started,
    }
    print(report(result))
    print(f"\nrun time {result['run_s']:.0f}s; JSON: {json_path}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
