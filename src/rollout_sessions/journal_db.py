"""The journal's database: its files, schema and row formats (``journal.Journal`` writes it).

One SQLite file in ``DATA_DIR`` (WAL mode, ``auto_vacuum=INCREMENTAL``) and a
lock file. Tables: ``meta`` (the registry's secrets, the mint reservation),
``sessions`` (key, id, kind, last write), ``turns`` (key, index, and the
turn's ``store.TurnWrite``: a small JSON head, the rest of the request, the
new messages framed, the token suffix, the zstd answer, the float32
logprobs) and ``deleted`` (the tombstone ring's deleted foreign ids, by slot).
Two triggers on ``turns`` make a recorded turn one statement, and one on
``sessions`` a forgotten session (see ``_SCHEMA``).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from rollout_sessions import errors
from rollout_sessions.answer import LOGPROB_TYPECODE, TOKEN_TYPECODE
from rollout_sessions.store import TurnWrite

DB_NAME = "journal.sqlite3"
LOCK_NAME = "LOCK"
EXPECTED = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME}
APPLICATION_ID = 0x52534A31  # "RSJ1": this is our journal, not another SQLite file
SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS deleted (slot INTEGER PRIMARY KEY, key BLOB NOT NULL, at REAL NOT NULL);
-- A turn is one statement (INSERT OR REPLACE at its index): each statement
-- costs the writer thread Python overhead and a GIL round trip with the
-- event loop. The triggers do the rest inside SQLite: a turn of a session
-- with no row is not written (the session was deleted or expired
-- meanwhile); a turn at index k replaces the turns from k on (a retry or
-- rollback) and touches the session's row.
CREATE TRIGGER IF NOT EXISTS turn_of_a_live_session BEFORE INSERT ON turns
WHEN NOT EXISTS (SELECT 1 FROM sessions WHERE key = NEW.key)
BEGIN
    SELECT RAISE(IGNORE);
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


def api_error(exc: sqlite3.Error) -> errors.ApiError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return errors.journal_full()
    return errors.journal_failed(str(exc))


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
        ]
    )


def turn_write(row: tuple[Any, ...]) -> TurnWrite:
    k, head, rest, messages, suffix, logprobs_len = row
    exact, n_messages, common, prompt_len, end, with_input_ids, cut, done, arrived = orjson.loads(
        head
    )
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
    )


def turns_by_session(conn: sqlite3.Connection) -> Iterator[tuple[bytes, list[tuple]]]:
    rows = conn.execute(
        "SELECT key, k, head, rest, messages, suffix, length(logprobs) FROM turns ORDER BY key, k"
    )
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


def lock_dir(directory: Path) -> Any:
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
    handle = open(directory / LOCK_NAME, "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise JournalError(
            f"DATA_DIR {directory} is in use by another server ({holder}); "
            f"each server needs its own DATA_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def checkpoint_connection(path: Path, sync: str) -> sqlite3.Connection:
    """A second connection to an open journal, for checkpoints only (they sync
    as its ``synchronous`` says, so it matches the writer's)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous = {_synchronous(sync)}")
    return conn


def _synchronous(sync: str) -> str:
    return "FULL" if sync == "full" else "NORMAL"


def open_db(path: Path, sync: str, max_bytes: int | None) -> sqlite3.Connection:
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
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"{path} has journal format {version}, this server reads {SCHEMA_VERSION}"
            )
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise JournalError(f"{path}: cannot switch to WAL mode")
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
        raise JournalError(
            f"{path} is not a readable journal ({exc}); nothing was deleted"
        ) from None
    return conn
