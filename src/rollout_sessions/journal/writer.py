"""The durable journal: an SQLite database in ``DATA_DIR``, written ahead of every answer.

What it keeps, so that a restart (even after ``kill -9``) brings everything
back: the registry's secrets and how far minting got (ids minted before
still recognised as ours: delete sticks for them with no tombstone), every
live session (id, kind, time of last write), every recorded turn in the
store's replayable form (``store.TurnWrite``: what is new in the turn, the
answer zstd-compressed), and the most recent deleted foreign ids with their
delete times (the tombstone ring, restored).

Durability. A turn, a create and a delete are answered only once their
write is committed: a write's result is settled after its COMMIT returned,
never before. One writer thread owns the connection and commits whatever is
queued as one transaction (group commit), off the event loop; reads that
must see those writes (``GET``, the export) queue behind them. A failed
transaction is retried one operation at a time, each in its own
transaction, so one bad write fails alone: 507 for lack of space, 503
naming any other failure (an unexpected exception included: the writer is
supervised and goes on). While nothing can be committed at all, ``failure``
says why (``/health`` answers 503 with it) and the writer probes the disk
until a commit succeeds again.
WAL mode with ``synchronous=NORMAL`` (default): a committed write is in the
WAL file, so a killed process loses nothing; a power loss or OS crash may
lose the transactions since the last checkpoint, which syncs (one every
``CHECKPOINT_EVERY_S``, by the ``Checkpointer`` thread; the database stays
consistent). ``JOURNAL_SYNC=full`` fsyncs every commit: nothing answered is
lost even then, at the cost of an fsync per batch.

Disk. Deleting or expiring a session deletes its rows; freed pages go back
to the filesystem (``auto_vacuum=INCREMENTAL`` plus periodic incremental
vacuum; the WAL file emptied once writes pause).
``JOURNAL_MAX_BYTES`` caps the database; a write past the cap, or on a full
disk, fails with 507 and changes nothing.

Minting. Ids handed out stay below a reservation that is on disk
(``mint_reserved``, raised a block at a time ahead of need, and only once
its write committed), so a restart never mints an id twice. If the
reservation cannot be written, minting answers 503 until it can.

Start-up refuses, naming the file, a ``DATA_DIR`` holding anything but the
journal (a foreign or corrupt file is never deleted), a ``DATA_DIR`` another
server holds (an OS lock on the directory), an empty database beside a
write-ahead log with commits, and a journal written under another instance
tag. Deleted ids beyond what the tombstone ring now holds are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from rollout_sessions.journal.db import (
    DB_NAME,
    KINDS,
    JournalError,
    api_error,
    checkpoint_connection,
    forget,
    frame,
    get_meta,
    head_bytes,
    lock_dir,
    node_head,
    node_messages,
    node_write,
    nodes_by_session,
    open_db,
    prune_deleted,
    set_meta,
    turn_write,
    turns_by_session,
)
from rollout_sessions.trajectory.forest import NodeWrite
from rollout_sessions.trajectory.store import LOGPROB_TYPECODE, TurnWrite
from rollout_sessions.web import errors

__all__ = ["Journal", "JournalError", "Restored"]

log = logging.getLogger("rollout_sessions")

MAX_BATCH = 512  # operations committed in one transaction at most
# Group commit under load: after a commit of at least LINGER_AFTER writes, a
# batch of fewer than LINGER_UNTIL waits up to LINGER_S for more (_gather).
LINGER_AFTER = 8
LINGER_UNTIL = 64
LINGER_S = 0.0002
MAINTENANCE_EVERY_S = 2.0
# How often the checkpointer copies the WAL into the database, and how many
# times in a row it tries to catch up with a writer that keeps appending.
CHECKPOINT_EVERY_S = 1.0
CHECKPOINT_TRIES = 4
# Minting reserves payloads ahead in blocks: an id handed out is always below
# the reservation on disk, so a restart never mints an id twice.
MINT_BLOCK = 1 << 20
# Less free space than this on the journal's disk: an I/O error is a full disk.
NO_ROOM_BYTES = 64 << 10
# Deleted ids the tombstone ring no longer holds are pruned from the table
# once this many (or an eighth of the capacity) have accumulated.
PRUNE_SLACK = 1024


@dataclass
class Restored:
    """What the journal gives back at start-up."""

    secrets: bytes | None
    mint_counter: int
    sessions: list[tuple[bytes, str, int, float]]  # (key, sid, kind, touched), oldest first
    turns: dict[bytes, list[TurnWrite]] = field(default_factory=dict)
    deleted: list[tuple[bytes, float]] = field(default_factory=list)  # (key, at), oldest first
    # Tree mode: each session's nodes in id order, with the matcher of their digests.
    nodes: dict[bytes, list[tuple[NodeWrite, str]]] = field(default_factory=dict)


class _Op:
    """One queued operation; ``run(conn)`` executes in the writer thread."""

    __slots__ = ("run", "future")

    def __init__(self, run: Callable[[sqlite3.Connection], Any], future: asyncio.Future | None):
        self.run = run
        self.future = future


class Journal:
    """The journal of one server process; open it before the registry exists."""

    def __init__(
        self, directory: str | os.PathLike[str], sync: str = "normal", max_bytes: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self._lock = lock_dir(self.directory)
        try:
            self._conn = open_db(self.directory / DB_NAME, sync, max_bytes)
        except BaseException:
            self._lock.close()
            raise
        self._checkpointer = Checkpointer(self.directory / DB_NAME, sync)
        self._compressor = zstandard.ZstdCompressor(level=1)
        # Operations gathered during one event-loop tick go to the writer
        # thread in one put: one wake-up per tick, not one per operation.
        self._pending: list[_Op] = []
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deleted_capacity = 1
        self._deleted_rows = 0  # at least the rows of ``deleted`` (writer thread)
        self.mint_reserved = 0  # durable: on disk, committed
        self._reserving: tuple[asyncio.Future, int] | None = None  # (write, its target)
        self.failure: str | None = None  # why nothing can be committed now (None: fine)

    # -- start-up (before the writer thread runs) ----------------------------------

    def load(
        self, deleted_capacity: int, instance_tag: int, progress: Callable[[int, int], None]
    ) -> Restored:
        """Everything to restore, in the order to restore it."""
        try:
            return self._load(deleted_capacity, instance_tag, progress)
        except JournalError:
            raise
        except Exception as exc:  # damaged rows, a full disk: never a raw traceback
            raise JournalError(self._cannot_start(exc)) from None

    def _load(
        self, deleted_capacity: int, instance_tag: int, progress: Callable[[int, int], None]
    ) -> Restored:
        conn = self._conn
        self._deleted_capacity = deleted_capacity
        stored_tag = get_meta(conn, "instance_tag")
        if stored_tag is not None and int(stored_tag) != instance_tag:
            raise JournalError(
                f"DATA_DIR {self.directory} holds the journal of instance tag "
                f"{int(stored_tag)}, and this server runs with --instance-tag {instance_tag}: "
                f"the ids minted there would no longer be recognised (deleted ones would come "
                f"back). Start with --instance-tag {int(stored_tag)}, or use another DATA_DIR "
                f"(nothing was deleted)"
            )
        with conn:  # what the ring restarting with this capacity cannot hold
            pruned = prune_deleted(conn, deleted_capacity)
        if pruned:
            log.info("journal: %d deleted ids beyond TOMBSTONE_CAPACITY forgotten", pruned)
        secrets = get_meta(conn, "secrets")
        reserved = int(get_meta(conn, "mint_reserved") or b"0")
        sessions = conn.execute(
            "SELECT key, sid, kind, touched FROM sessions ORDER BY touched"
        ).fetchall()
        restored = Restored(secrets, reserved, sessions)
        total = len(sessions)
        done = 0
        for key, rows in turns_by_session(conn):
            restored.turns[key] = [turn_write(row) for row in rows]
            done += 1
            if done % 10_000 == 0:
                progress(done, total)
        for key, rows in nodes_by_session(conn):
            restored.nodes[key] = [node_write(row) for row in rows]
        restored.deleted = conn.execute("SELECT key, at FROM deleted ORDER BY rowid").fetchall()
        self._deleted_rows = len(restored.deleted)
        return restored

    def save_start(self, secrets: bytes, mint_counter: int, instance_tag: int) -> None:
        """Keep the registry's secrets and instance tag, and reserve the first block
        of mints (committed before the server answers anything)."""
        reserved = mint_counter + MINT_BLOCK
        try:
            with self._conn:
                set_meta(self._conn, "secrets", secrets)
                set_meta(self._conn, "instance_tag", str(instance_tag).encode())
                set_meta(self._conn, "mint_reserved", str(reserved).encode())
        except Exception as exc:
            raise JournalError(self._cannot_start(exc)) from None
        self.mint_reserved = reserved

    def read_turn_answers(self, key: bytes) -> list[bytes]:
        """At start-up: the compressed answers of a session's turns, in order."""
        rows = self._conn.execute("SELECT answer FROM turns WHERE key = ? ORDER BY k", (key,))
        return [row[0] for row in rows]

    def turns_to_nodes(self, key: bytes, writes: list[NodeWrite], matcher: str) -> None:
        """At start-up: a session's turns rewritten as nodes (tree mode taking over
        a session recorded in linear mode); answers and logprobs move as they are."""
        with self._conn:
            for k, write in enumerate(writes):
                self._conn.execute(
                    "INSERT INTO nodes SELECT key, k, ?, ?, ?, ?, answer, logprobs "
                    "FROM turns WHERE key = ? AND k = ?",
                    (
                        node_head(write, matcher),
                        write.rest,
                        node_messages(write),
                        write.suffix.tobytes(),
                        key,
                        k,
                    ),
                )
            self._conn.execute("DELETE FROM turns WHERE key = ?", (key,))

    def _cannot_start(self, exc: BaseException) -> str:
        if api_error(exc).status == 507:
            return (
                f"no space left for the journal in {self.directory} ({exc}); free space on "
                f"its disk (or raise JOURNAL_MAX_BYTES) and start again (nothing was deleted)"
            )
        return (
            f"the journal in {self.directory} cannot be read back "
            f"({type(exc).__name__}: {exc}); nothing was deleted"
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="rollout-sessions-journal")
        self._thread.start()
        self._checkpointer.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._checkpointer.stop)
        self._flush()
        self._queue.put(None)  # after everything queued before it
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._conn.close()
        self._lock.close()

    # -- writes --------------------------------------------------------------------
    # Each is queued when called, not when awaited (a read asked for under a
    # session lock is ordered by that lock), and returns its commit's future.

    def create(self, key: bytes, sid: str, kind: str) -> asyncio.Future:
        now = time.time()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)", (key, sid, KINDS[kind], now)
            )

        return self._submit(run)

    def turn(
        self, key: bytes, sid: str, kind: str, write: TurnWrite, has_row: bool
    ) -> asyncio.Future:
        """A recorded turn. ``has_row``: the session's row is known to be written
        (it has a committed turn); else it is written first (an auto-created
        session's first turn), with ``kind``."""
        now = time.time()
        compress = self._compressor.compress

        def run(conn: sqlite3.Connection) -> None:
            if not has_row:
                _session_row(conn, key, sid, kind, now)
            # The triggers (journal_db) drop the turns after it and touch the session.
            conn.execute(
                "INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    write.keep,
                    head_bytes(write),
                    write.rest,
                    frame(write.messages),
                    write.suffix.tobytes(),
                    compress(write.answer),  # in this thread: zstd lets go of the GIL
                    write.logprobs.tobytes(),
                ),
            )

        return self._submit(run)

    def nodes(
        self,
        key: bytes,
        sid: str,
        kind: str,
        writes: list[NodeWrite],
        matcher: str,
        has_row: bool,
        first_id: int,
    ) -> asyncio.Future:
        """Nodes recorded by one turn (several for n > 1), in one transaction, with
        ids from ``first_id``. ``has_row`` as for ``turn``."""
        now = time.time()
        compress = self._compressor.compress

        def run(conn: sqlite3.Connection) -> None:
            if not has_row:
                _session_row(conn, key, sid, kind, now)
            conn.executemany(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        key,
                        first_id + i,
                        node_head(write, matcher),
                        write.rest,
                        node_messages(write),
                        write.suffix.tobytes(),
                        compress(write.answer),  # in this thread: zstd lets go of the GIL
                        write.logprobs.tobytes(),
                    )
                    for i, write in enumerate(writes)
                ],
            )

        return self._submit(run)

    def delete(self, key: bytes, foreign: bool) -> asyncio.Future:
        """A session deleted; a foreign id is remembered for the tombstone ring."""
        now = time.time()

        def run(conn: sqlite3.Connection) -> None:
            forget(conn, key)
            if foreign:
                conn.execute("INSERT OR REPLACE INTO deleted (key, at) VALUES (?, ?)", (key, now))
                self._deleted_rows += 1

        return self._submit(run)

    def expire(self, key: bytes) -> None:
        """A session evicted after its idle TTL (nobody waits for this write)."""
        self._enqueue(_Op(lambda conn: forget(conn, key), None))

    def reserve_mints(self, next_counter: int) -> asyncio.Future | None:
        """Before minting the id numbered ``next_counter``: None when it is below
        the reservation on disk; else the future of the write that raises it,
        to await (it fails when the write did: then no id may be minted).

        The next block is written ahead, once half of the current one is
        used, so minting waits only when that write has not committed in time.
        """
        if self._reserving is not None and self._reserving[0].done():
            # Settled, its callback not yet run (it runs later in this loop pass):
            # a failed write must not be handed to a minter that came after it.
            self._reserved(*self._reserving)
        if next_counter >= self.mint_reserved - MINT_BLOCK // 2 and self._reserving is None:
            target = self.mint_reserved + MINT_BLOCK
            value = str(target).encode()
            future = self._submit(lambda conn: set_meta(conn, "mint_reserved", value))
            self._reserving = (future, target)
            future.add_done_callback(lambda done: self._reserved(done, target))
        if next_counter < self.mint_reserved:
            return None
        assert self._reserving is not None  # started above: the counter is past half the block
        return self._reserving[0]

    def _reserved(self, done: asyncio.Future, target: int) -> None:
        """A reservation write settled (called once or twice: idempotent)."""
        if self._reserving is not None and self._reserving[0] is done:
            self._reserving = None
        if not done.cancelled() and done.exception() is None:
            self.mint_reserved = max(self.mint_reserved, target)

    # -- reads (queued behind the writes before them) -------------------------------

    def answers(self, key: bytes) -> asyncio.Future:
        """The compressed answers of a session's turns, in order (a list of bytes)."""
        return self._submit(
            lambda conn: [
                row[0]
                for row in conn.execute("SELECT answer FROM turns WHERE key = ? ORDER BY k", (key,))
            ]
        )

    def logprobs(self, key: bytes) -> asyncio.Future:
        """The logprobs of a session's turns, in order (a list of float32 arrays)."""

        query = "SELECT logprobs FROM turns WHERE key = ? ORDER BY k"
        return self._submit(lambda conn: _logprobs(conn, query, key))

    def turn_answers(self, key: bytes, ks: list[int]) -> asyncio.Future:
        """The compressed answers of a session's turns ``ks``, in that order."""

        def run(conn: sqlite3.Connection) -> list[bytes]:
            query = "SELECT answer FROM turns WHERE key = ? AND k = ?"
            return [conn.execute(query, (key, k)).fetchone()[0] for k in ks]

        return self._submit(run)

    def node_answers(self, key: bytes, ids: list[int] | None = None) -> asyncio.Future:
        """The compressed answers of a session's nodes in id order (or of ``ids``)."""
        if ids is None:
            return self._submit(
                lambda conn: [
                    row[0]
                    for row in conn.execute(
                        "SELECT answer FROM nodes WHERE key = ? ORDER BY id", (key,)
                    )
                ]
            )

        def run(conn: sqlite3.Connection) -> list[bytes]:
            # Few statements (one per node cost the writer a GIL round trip each);
            # at most 500 ids per statement (SQLite's variable limit may be 999).
            found: dict[int, bytes] = {}
            for at in range(0, len(ids), 500):
                part = ids[at : at + 500]
                marks = ",".join("?" * len(part))
                query = f"SELECT id, answer FROM nodes WHERE key = ? AND id IN ({marks})"
                found.update(conn.execute(query, (key, *part)).fetchall())
            return [found[k] for k in ids]

        return self._submit(run)

    def node_logprobs(self, key: bytes) -> asyncio.Future:
        """The logprobs of a session's nodes, in id order (float32 arrays)."""

        return self._submit(
            lambda conn: _logprobs(
                conn, "SELECT logprobs FROM nodes WHERE key = ? ORDER BY id", key
            )
        )

    def disk_bytes(self) -> int:
        return sum(
            (self.directory / name).stat().st_size
            for name in (DB_NAME, f"{DB_NAME}-wal")
            if (self.directory / name).exists()
        )

    # -- the writer thread --------------------------------------------------------------

    def _submit(self, run: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        assert self._loop is not None, "journal not started"
        thread = self._thread
        if thread is None or not thread.is_alive():  # never a future nobody settles
            raise errors.journal_failed("the journal's writer is not running")
        future = self._loop.create_future()
        self._enqueue(_Op(run, future))
        return future

    def _enqueue(self, op: _Op) -> None:
        pending = self._pending
        pending.append(op)
        if len(pending) == 1:
            if self._loop is None:  # not started: nothing to gather with
                self._flush()
            else:
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def _run(self) -> None:
        last_maintenance = time.monotonic()
        closing = False
        previous = 0  # operations in the last commit
        while not closing:
            batch: list[_Op] = []
            try:
                try:
                    got = self._queue.get(timeout=MAINTENANCE_EVERY_S)
                except queue.Empty:
                    got = []
                batch, closing = self._gather(got, linger=previous >= LINGER_AFTER)
                if batch:
                    self._commit(batch)
                elif self.failure is not None:
                    self._probe()
                previous = len(batch)
                if time.monotonic() - last_maintenance > MAINTENANCE_EVERY_S and not closing:
                    last_maintenance = time.monotonic()
                    self._maintain()
            except Exception as exc:  # supervised: the writer never dies with futures unsettled
                log.exception("journal writer: unexpected failure")
                self._settle([(op, None, self._answer(exc)) for op in batch])

    def _gather(self, got: list[_Op] | None, linger: bool) -> tuple[list[_Op], bool]:
        """``got`` and what else is queued, up to ``MAX_BATCH``; whether to close.

        With ``linger`` (the last commit was a large group: many writers), a
        batch still under ``LINGER_UNTIL`` waits once, at most ``LINGER_S``,
        for the next loop pass's writes. Fewer, larger commits cost less per
        write, on this thread and on the event loop (fewer wake-ups, fuller
        passes; the lifecycle benchmark's gain is in CHANGELOG.md). A lone client
        (commits of one) never waits.
        """
        batch: list[_Op] = []
        while got is not None:
            batch += got
            if len(batch) >= MAX_BATCH:
                break
            try:
                got = self._queue.get_nowait()
            except queue.Empty:
                if not linger or not batch or len(batch) >= LINGER_UNTIL:
                    break
                linger = False
                try:
                    got = self._queue.get(timeout=LINGER_S)
                except queue.Empty:
                    break
        return batch, got is None

    def _transaction(self, ops: list[_Op]) -> list[Any]:
        """Run ``ops`` in one transaction; their values once its COMMIT returned.
        Raises (and rolls back) if any of them or the COMMIT fails."""
        conn = self._conn
        try:
            with conn:
                values = [op.run(conn) for op in ops]
        except BaseException:
            if conn.in_transaction:  # e.g. a failed COMMIT whose rollback failed too
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            raise
        return values

    def _commit(self, batch: list[_Op]) -> None:
        results: list[tuple[_Op, Any, BaseException | None]]
        try:
            values = self._transaction(batch)
            results = [(op, value, None) for op, value in zip(batch, values, strict=True)]
        except Exception:
            # Find out which failed: each alone, each settled after its own COMMIT.
            results = []
            for op in batch:
                try:
                    results.append((op, self._transaction([op])[0], None))
                except Exception as exc:
                    results.append((op, None, self._answer(exc)))
        failed = [error for _, _, error in results if error is not None]
        if len(failed) < len(results):
            self._healthy()
        elif failed:
            self._failing(failed[0])
        self._settle(results)

    def _answer(self, exc: BaseException) -> BaseException:
        """The answer for a write that failed: ``api_error``'s, except that an I/O
        error on a disk with no room left is a lack of space (507) too (SQLite
        reports some of those as I/O errors: a short write, the shared-memory
        file that cannot grow)."""
        err = api_error(exc)
        if err.status == 503 and isinstance(exc, sqlite3.Error):
            with contextlib.suppress(OSError):
                room = os.statvfs(self.directory)
                if room.f_bavail * room.f_frsize < NO_ROOM_BYTES:
                    return errors.journal_full()
        return err

    def _settle(self, results: list[tuple[_Op, Any, BaseException | None]]) -> None:
        if not results or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, results)

    def _failing(self, error: BaseException) -> None:
        reason = str(error)
        if self.failure != reason:
            log.error("journal cannot write: %s", reason)
        self.failure = reason

    def _healthy(self) -> None:
        if self.failure is not None:
            log.warning("journal writes again (was: %s)", self.failure)
            self.failure = None

    def _probe(self) -> None:
        """While nothing could be committed: whether a commit works again (space
        came back), so ``/health`` recovers without waiting for a client's write."""
        try:
            self._transaction([_Op(lambda conn: set_meta(conn, "probe", b"1"), None)])
        except Exception as exc:
            self._failing(self._answer(exc))
        else:
            self._healthy()

    def _maintain(self) -> None:
        """Give freed pages back to the filesystem (the WAL is the checkpointer's),
        and forget deleted ids the tombstone ring no longer holds."""
        try:
            conn = self._conn
            capacity = self._deleted_capacity
            if self._deleted_rows > capacity + max(PRUNE_SLACK, capacity // 8):
                with conn:  # a scan of the table: amortised over many deletes
                    prune_deleted(conn, capacity)
                self._deleted_rows = conn.execute("SELECT count(*) FROM deleted").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free > 256:
                # As a script: run to the end (one execute() step frees one page).
                conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            log.warning("journal maintenance failed: %s", exc)


class Checkpointer:
    """Copies the WAL into the database on a thread and connection of its own,
    every ``CHECKPOINT_EVERY_S``.

    A truncating checkpoint alone holds every write off while it copies and
    syncs (a stall of every commit at each checkpoint, when the writer did it).
    Here passive checkpoints copy the bulk while turns keep committing, and a
    restarting one then holds the writer only for what is left, so that the
    WAL file starts over (cut to ``WAL_LIMIT_BYTES``). Once nothing has been
    written for a whole period, the file is emptied.
    """

    def __init__(self, path: Path, sync: str) -> None:
        self._path = path
        self._sync = sync
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-sessions-checkpoint")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = checkpoint_connection(self._path, self._sync)
        except sqlite3.Error as exc:
            # The writer's own automatic checkpoints keep the WAL bounded.
            log.error("journal checkpointer not started: %s", exc)
            return
        version = None
        try:
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                version = self.checkpoint(conn, version)
        finally:
            conn.close()

    @staticmethod
    def checkpoint(conn: sqlite3.Connection, last_version: int | None) -> int | None:
        """Copy the WAL without stopping the writer, then start it over; the
        database's ``data_version`` to pass to the next call.

        Passive checkpoints copy the bulk while the writer goes on (a few
        tries: it appends meanwhile, less each time). A writer that never
        pauses would keep the last frames uncopied and the WAL growing, so a
        restarting checkpoint then holds writes off for what is left (a few
        frames and the syncs), not for the whole copy. When nothing was
        committed since the last call, the file is emptied instead (holding
        off no one: there is nothing to copy).
        """
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == last_version:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                return version
            for _ in range(CHECKPOINT_TRIES):
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy or copied >= frames:
                    break
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            return version
        except sqlite3.Error as exc:
            log.warning("journal checkpoint failed: %s", exc)
            return None


def _session_row(conn: sqlite3.Connection, key: bytes, sid: str, kind: str, now: float) -> None:
    """An auto-created session's row, written with its first turn."""
    conn.execute(
        "INSERT INTO sessions VALUES (?, ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET touched = excluded.touched",
        (key, sid, KINDS[kind], now),
    )


def _logprobs(conn: sqlite3.Connection, query: str, key: bytes) -> list[array]:
    """Each row's float32 logprobs blob, as an array."""
    out = []
    for (blob,) in conn.execute(query, (key,)):
        values = array(LOGPROB_TYPECODE)
        values.frombytes(blob)
        out.append(values)
    return out


def _resolve(results: list[tuple[_Op, Any, BaseException | None]]) -> None:
    for op, value, error in results:
        future = op.future
        if future is None or future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
