"""The journal's database: its files, schema and row formats (``journal.Journal`` writes it).

One SQLite file in ``DATA_DIR`` (WAL mode, ``auto_vacuum=INCREMENTAL``); the
directory itself is held with an OS lock (``flock``), and a ``LOCK`` file
names the holder. Tables: ``meta`` (the registry's secrets, the durable mint
reservation, the instance tag), ``sessions`` (key, id, kind, last write),
``turns`` (key, index, and the turn's ``store.TurnWrite``: a small JSON head,
the rest of the request, the new messages framed, the token suffix, the zstd
answer, the float32 logprobs), ``nodes`` (tree mode: key, node id, and the
node's ``forest.NodeWrite`` in the same columns) and ``deleted`` (deleted foreign ids, in delete
order; pruned to the newest ``TOMBSTONE_CAPACITY``). Triggers keep a turn
one statement and a forgotten session one statement (see ``_SCHEMA``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from rollout_sessions.trajectory.forest import NodeWrite
from rollout_sessions.trajectory.store import LOGPROB_TYPECODE, TOKEN_TYPECODE, TurnWrite, _shared
from rollout_sessions.web import errors

DB_NAME = "journal.sqlite3"
LOCK_NAME = "LOCK"
EXPECTED = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME}
APPLICATION_ID = 0x52534A31  # "RSJ1": this is our journal, not another SQLite file
SCHEMA_VERSION = 2
# Format 1 kept deleted ids by ring slot and dropped the turn of a session
# with no row silently; ``_migrate`` brings it to format 2.
MIGRATABLE_VERSIONS = {1}
KINDS = {"minted": 0, "by_id": 1, "auto": 2}
# Should the checkpointer fall behind: the writer checkpoints by itself past
# this many WAL pages (64 MiB of 4 KiB), and the WAL file is cut back to
# WAL_LIMIT_BYTES whenever it starts over.
WAL_AUTOCHECKPOINT_PAGES = 16_000
WAL_LIMIT_BYTES = 16 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    key BLOB PRIMARY KEY, sid TEXT NOT NULL, kind INTEGER NOT NULL, touched REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    key BLOB NOT NULL, k INTEGER NOT NULL, head BLOB NOT NULL, rest BLOB NOT NULL,
    messages BLOB NOT NULL, suffix BLOB NOT NULL, answer BLOB NOT NULL, logprobs BLOB NOT NULL,
    PRIMARY KEY (key, k)
);
-- Deleted foreign ids; rowid order is delete order (a replaced row gets a new rowid).
CREATE TABLE IF NOT EXISTS deleted (key BLOB PRIMARY KEY, at REAL NOT NULL);
-- A turn is one statement (INSERT OR REPLACE at its index): each statement
-- costs the writer thread Python overhead and a GIL round trip with the
-- event loop. The triggers do the rest inside SQLite: a turn at index k
-- replaces the turns from k on (a retry or rollback) and touches the
-- session's row. A turn whose session has no row fails its write (never
-- dropped silently: the turn is then not answered as recorded).
CREATE TRIGGER IF NOT EXISTS turn_needs_its_session BEFORE INSERT ON turns
WHEN NOT EXISTS (SELECT 1 FROM sessions WHERE key = NEW.key)
BEGIN
    SELECT RAISE(ABORT, 'the session has no row in the journal');
END;
CREATE TRIGGER IF NOT EXISTS turn_written AFTER INSERT ON turns
BEGIN
    DELETE FROM turns WHERE key = NEW.key AND k > NEW.k;
    UPDATE sessions SET touched = (julianday('now') - 2440587.5) * 86400.0
    WHERE key = NEW.key;
END;
-- Deleting (or expiring) a session is one statement too: its turns go with
-- its row. (An INSERT OR REPLACE of a row does not fire it: recursive
-- triggers are off, and a live session's row is never replaced.)
CREATE TRIGGER IF NOT EXISTS session_forgotten AFTER DELETE ON sessions
BEGIN
    DELETE FROM turns WHERE key = OLD.key;
END;
-- Tree mode: a session's nodes (forest.NodeWrite), by node id. A node is
-- never replaced: a retry is a new node. Like a turn, one statement.
CREATE TABLE IF NOT EXISTS nodes (
    key BLOB NOT NULL, id INTEGER NOT NULL, head BLOB NOT NULL, rest BLOB NOT NULL,
    messages BLOB NOT NULL, suffix BLOB NOT NULL, answer BLOB NOT NULL, logprobs BLOB NOT NULL,
    PRIMARY KEY (key, id)
);
CREATE TRIGGER IF NOT EXISTS node_needs_its_session BEFORE INSERT ON nodes
WHEN NOT EXISTS (SELECT 1 FROM sessions WHERE key = NEW.key)
BEGIN
    SELECT RAISE(ABORT, 'the session has no row in the journal');
END;
CREATE TRIGGER IF NOT EXISTS node_written AFTER INSERT ON nodes
BEGIN
    UPDATE sessions SET touched = (julianday('now') - 2440587.5) * 86400.0
    WHERE key = NEW.key;
END;
CREATE TRIGGER IF NOT EXISTS session_forgotten_nodes AFTER DELETE ON sessions
BEGIN
    DELETE FROM nodes WHERE key = OLD.key;
END;
-- A session created under an id whose delete the tombstone ring has
-- forgotten supersedes that delete: a restart must bring the session back.
CREATE TRIGGER IF NOT EXISTS session_supersedes_its_delete AFTER INSERT ON sessions
BEGIN
    DELETE FROM deleted WHERE key = NEW.key;
END;
"""


class JournalError(Exception):
    """The journal cannot start: the message says why and names the file."""


def frame(parts: tuple[bytes, ...]) -> bytes:
    """Byte strings as one: their count, their lengths (uint32), then themselves."""
    lengths = array("I", [len(p) for p in parts])
    return len(parts).to_bytes(4, "little") + lengths.tobytes() + b"".join(parts)


def unframe(blob: bytes) -> tuple[bytes, ...]:
    n = int.from_bytes(blob[:4], "little")
    lengths = array("I")
    lengths.frombytes(blob[4 : 4 + 4 * n])
    out, at = [], 4 + 4 * n
    for length in lengths:
        out.append(blob[at : at + length])
        at += length
    return tuple(out)


def api_error(exc: BaseException) -> errors.ApiError:
    """The answer for a write that failed: 507 for lack of space, else 503 naming it."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
            return errors.journal_full()
        return errors.journal_failed(str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.journal_full()
    return errors.journal_failed(f"{type(exc).__name__}: {exc}")


def prune_deleted(conn: sqlite3.Connection, keep: int) -> int:
    """Keep the ``keep`` most recent deleted ids (what the tombstone ring holds);
    the number of rows removed."""
    if keep <= 0:
        return conn.execute("DELETE FROM deleted").rowcount
    cur = conn.execute(
        "DELETE FROM deleted WHERE rowid < "
        "(SELECT rowid FROM deleted ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
        (keep - 1,),
    )
    return cur.rowcount


def forget(conn: sqlite3.Connection, key: bytes) -> None:
    """A session and its turns, gone (the trigger ``session_forgotten``)."""
    conn.execute("DELETE FROM sessions WHERE key = ?", (key,))


def head_bytes(write: TurnWrite) -> bytes:
    return orjson.dumps(
        [
            write.exact,
            write.n_messages,
            write.common,
            write.prompt_len,
            write.end,
            write.with_input_ids,
            write.cut,
            write.timestamps[0],
            write.timestamps[1],
            *(write.extras or ()),
        ]
    )


def turn_write(row: tuple[Any, ...]) -> TurnWrite:
    k, head, rest, messages, suffix, logprobs_len = row
    fields = orjson.loads(head)
    exact, n_messages, common, prompt_len, end, with_input_ids, cut, done, arrived = fields[:9]
    extras = tuple(fields[9:13]) if len(fields) >= 13 else None  # older rows: not kept
    tokens = array(TOKEN_TYPECODE)
    tokens.frombytes(suffix)
    return TurnWrite(
        keep=k,
        exact=exact,
        messages=unframe(messages),
        n_messages=n_messages,
        common=common,
        suffix=tokens,
        prompt_len=prompt_len,
        end=end,
        rest=rest,
        with_input_ids=bool(with_input_ids),
        answer=b"",  # stays on disk
        cut=cut,
        logprobs=array(LOGPROB_TYPECODE),  # stays on disk
        timestamps=(done, arrived),
        extras=_shared(extras),  # type: ignore[arg-type]
    )


def node_head(write: NodeWrite, matcher: str) -> bytes:
    return orjson.dumps(
        [
            write.parent,
            write.seen,
            write.common,
            write.prompt_len,
            write.end,
            write.flags,
            write.cut,
            write.timestamps[0],
            write.timestamps[1],
            write.finish_reason,
            write.response_id,
            write.weight_version,
            write.cached_tokens,
            matcher,
            write.digest.hex(),
            [i for i, _ in write.overrides],
            b"".join(write.message_digests).hex(),
        ]
    )


def node_messages(write: NodeWrite) -> bytes:
    """The delta's messages, then the overrides' texts."""
    return frame((*write.messages, *(text for _, text in write.overrides)))


def node_write(row: tuple[Any, ...]) -> tuple[NodeWrite, str]:
    """A node row (without its answer and logprobs) and the matcher its digest is of."""
    _id, head, rest, messages, suffix = row
    (
        parent, seen, common, prompt_len, end, flags, cut, done, arrived,
        finish, response_id, weight_version, cached, matcher, digest, override_at, ones,
    ) = orjson.loads(head)  # fmt: skip
    ones = bytes.fromhex(ones)
    texts = unframe(messages)
    n_delta = len(texts) - len(override_at)
    tokens = array(TOKEN_TYPECODE)
    tokens.frombytes(suffix)
    write = NodeWrite(
        parent=parent,
        seen=seen,
        messages=texts[:n_delta],
        overrides=tuple(zip(override_at, texts[n_delta:], strict=True)),
        common=common,
        suffix=tokens,
        prompt_len=prompt_len,
        end=end,
        rest=rest,
        flags=flags,
        answer=b"",  # stays on disk
        cut=cut,
        logprobs=array(LOGPROB_TYPECODE),  # stays on disk
        timestamps=(done, arrived),
        finish_reason=finish,
        response_id=response_id,
        weight_version=weight_version,
        cached_tokens=cached,
        digest=bytes.fromhex(digest),
        message_digests=tuple(ones[i : i + 16] for i in range(0, len(ones), 16)),
    )
    return write, matcher


def nodes_by_session(conn: sqlite3.Connection) -> Iterator[tuple[bytes, list[tuple]]]:
    return _grouped(
        conn.execute("SELECT key, id, head, rest, messages, suffix FROM nodes ORDER BY key, id")
    )


def turns_by_session(conn: sqlite3.Connection) -> Iterator[tuple[bytes, list[tuple]]]:
    return _grouped(
        conn.execute(
            "SELECT key, k, head, rest, messages, suffix, length(logprobs) "
            "FROM turns ORDER BY key, k"
        )
    )


def _grouped(rows: Iterator[tuple]) -> Iterator[tuple[bytes, list[tuple]]]:
    current: bytes | None = None
    group: list[tuple] = []
    for key, *row in rows:
        if key != current:
            if current is not None:
                yield current, group
            current, group = key, []
        group.append(tuple(row))
    if current is not None:
        yield current, group


def get_meta(conn: sqlite3.Connection, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return bytes(row[0]) if row else None


def set_meta(conn: sqlite3.Connection, name: str, value: bytes) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))


class DirectoryLock:
    """An exclusive OS lock (``flock``) on ``DATA_DIR`` itself, held for the
    process's life: deleting the ``LOCK`` file (which only names the holder)
    cannot let a second server in."""

    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            try:
                holder = (directory / LOCK_NAME).read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise JournalError(
                f"DATA_DIR {directory} is in use by another server ({holder}); "
                f"each server needs its own DATA_DIR"
            ) from None
        try:
            (directory / LOCK_NAME).write_text(f"pid {os.getpid()}\n")
        except OSError as exc:
            self.close()
            raise JournalError(f"cannot write {directory / LOCK_NAME}: {exc}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def lock_dir(directory: Path) -> DirectoryLock:
    """Create the directory, refuse foreign files in it, take its lock."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"cannot create DATA_DIR {directory}: {exc}") from None
    for entry in sorted(directory.iterdir()):
        if entry.name not in EXPECTED:
            raise JournalError(
                f"DATA_DIR {directory} holds {entry}, which is not part of a journal; "
                f"move it away or choose another DATA_DIR (nothing was deleted)"
            )
    return DirectoryLock(directory)


def checkpoint_connection(path: Path, sync: str) -> sqlite3.Connection:
    """A second connection to an open journal, for checkpoints only (they sync
    as its ``synchronous`` says, so it matches the writer's)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous = {_synchronous(sync)}")
    return conn


def _synchronous(sync: str) -> str:
    return "FULL" if sync == "full" else "NORMAL"


def _refuse_a_lost_database(path: Path) -> None:
    """A WAL with content beside a missing or empty database: the database file
    was truncated or replaced. Opening it would discard the log's commits."""
    wal = path.with_name(path.name + "-wal")
    try:
        wal_bytes = wal.stat().st_size
        db_bytes = path.stat().st_size if path.exists() else 0
    except FileNotFoundError:
        return
    if wal_bytes > 0 and db_bytes == 0:
        raise JournalError(
            f"{path} is empty or missing but its write-ahead log {wal} holds {wal_bytes} "
            f"bytes of commits: the database file was truncated or replaced. Restore it, or "
            f"move both files away to start a new journal (nothing was deleted)"
        )


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Format 1 -> 2: deleted ids keyed by id in delete order (not by ring slot,
    which tied the table to one ring capacity), and a turn of a session with
    no row fails instead of being dropped."""
    with conn:
        conn.execute("ALTER TABLE deleted RENAME TO deleted_v1")
        conn.execute("CREATE TABLE deleted (key BLOB PRIMARY KEY, at REAL NOT NULL)")
        conn.execute(
            "INSERT OR REPLACE INTO deleted (key, at) SELECT key, at FROM deleted_v1 ORDER BY at"
        )
        conn.execute("DROP TABLE deleted_v1")
        conn.execute("DROP TRIGGER IF EXISTS turn_of_a_live_session")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def open_db(path: Path, sync: str, max_bytes: int | None) -> sqlite3.Connection:
    _refuse_a_lost_database(path)
    fresh = not path.exists() or path.stat().st_size == 0
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.isolation_level = "DEFERRED"  # `with conn` opens and commits transactions
        if fresh:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise JournalError(
                f"{path} is an SQLite database but not a rollout-sessions journal "
                f"(application_id {app_id}); move it away (nothing was deleted)"
            )
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise JournalError(f"{path}: cannot switch to WAL mode")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version in MIGRATABLE_VERSIONS:
            _migrate(conn, version)
        elif version != SCHEMA_VERSION:
            raise JournalError(
                f"{path} has journal format {version}, this server reads {SCHEMA_VERSION}"
            )
        conn.execute(f"PRAGMA synchronous = {_synchronous(sync)}")
        # Freed pages need not be zeroed (some builds do by default), and a
        # longer WAL between checkpoints writes each page back less often.
        conn.execute("PRAGMA secure_delete = OFF")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        if max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(16, max_bytes // page)}")
        conn.executescript(_SCHEMA)
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise JournalError(f"{path} is damaged (quick_check failed); nothing was deleted")
    except sqlite3.DatabaseError as exc:
        if api_error(exc).status == 507:
            raise JournalError(
                f"no space left for the journal {path} ({exc}); free space on its disk "
                f"(or raise JOURNAL_MAX_BYTES) and start again (nothing was deleted)"
            ) from None
        raise JournalError(
            f"{path} is not a readable journal ({exc}); nothing was deleted"
        ) from None
    except OSError as exc:
        raise JournalError(f"cannot open the journal {path}: {exc}") from None
    return conn
