"""The journal's schema: a turn is one statement, its triggers do the rest."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from rollout_sessions.journal.db import (
    APPLICATION_ID,
    DB_NAME,
    SCHEMA_VERSION,
    forget,
    open_db,
    prune_deleted,
)

KEY = b"k" * 16
WRITE_TURN = "INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def turn(k: int, head: bytes = b"h") -> tuple:
    return (KEY, k, head, b"rest", b"messages", b"suffix", b"answer", b"logprobs")


def turns(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
    return conn.execute("SELECT k, head FROM turns WHERE key = ? ORDER BY k", (KEY,)).fetchall()


def test_a_turn_of_a_session_without_a_row_fails_and_writes_nothing(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    with pytest.raises(sqlite3.IntegrityError, match="no row"), conn:
        conn.execute(WRITE_TURN, turn(0))  # never dropped silently: the turn is not answered
    assert turns(conn) == []


def test_a_turn_replaces_the_turns_from_its_index_and_touches_the_session(
    tmp_path: Path,
) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    with conn:
        conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (KEY, "sid", 2, 1.0))
        for k in range(3):
            conn.execute(WRITE_TURN, turn(k))
    assert [k for k, _ in turns(conn)] == [0, 1, 2]
    before = time.time()
    with conn:  # a retry at index 1: it replaces turn 1 and drops turn 2
        conn.execute(WRITE_TURN, turn(1, b"again"))
    after = time.time()
    assert turns(conn) == [(0, b"h"), (1, b"again")]
    touched = conn.execute("SELECT touched FROM sessions WHERE key = ?", (KEY,)).fetchone()[0]
    assert before - 0.01 <= touched <= after + 0.01  # SQLite's clock, to the millisecond


def test_a_journal_without_the_triggers_gets_them_at_open(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    conn = open_db(path, "normal", None)
    conn.executescript(
        "DROP TRIGGER turn_needs_its_session; DROP TRIGGER turn_written; "
        "DROP TRIGGER session_forgotten; DROP TRIGGER session_supersedes_its_delete;"
    )
    conn.close()
    conn = open_db(path, "normal", None)
    assert triggers(conn) == TRIGGERS


TRIGGERS = {
    "turn_needs_its_session",
    "turn_written",
    "session_forgotten",
    "session_supersedes_its_delete",
    # tree mode's nodes
    "node_needs_its_session",
    "node_written",
    "session_forgotten_nodes",
}


def triggers(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}


def test_a_format_1_journal_is_migrated_keeping_its_deletes_in_order(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""
        PRAGMA application_id = {APPLICATION_ID};
        PRAGMA user_version = 1;
        CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE sessions (key BLOB PRIMARY KEY, sid TEXT NOT NULL, kind INTEGER NOT NULL,
                               touched REAL NOT NULL);
        CREATE TABLE turns (key BLOB NOT NULL, k INTEGER NOT NULL, head BLOB NOT NULL,
                            rest BLOB NOT NULL, messages BLOB NOT NULL, suffix BLOB NOT NULL,
                            answer BLOB NOT NULL, logprobs BLOB NOT NULL, PRIMARY KEY (key, k));
        CREATE TABLE deleted (slot INTEGER PRIMARY KEY, key BLOB NOT NULL, at REAL NOT NULL);
        CREATE TRIGGER turn_of_a_live_session BEFORE INSERT ON turns
        WHEN NOT EXISTS (SELECT 1 FROM sessions WHERE key = NEW.key)
        BEGIN SELECT RAISE(IGNORE); END;
        INSERT INTO deleted VALUES (0, x'03', 30.0), (1, x'01', 10.0), (2, x'02', 20.0);
        """
    )
    conn.close()
    conn = open_db(path, "normal", None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert triggers(conn) == TRIGGERS
    rows = conn.execute("SELECT key, at FROM deleted ORDER BY rowid").fetchall()
    assert rows == [(b"\x01", 10.0), (b"\x02", 20.0), (b"\x03", 30.0)]


def test_a_session_created_again_supersedes_its_forgotten_delete(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    with conn:
        conn.execute("INSERT INTO deleted (key, at) VALUES (?, ?)", (KEY, 1.0))
        conn.execute("INSERT INTO deleted (key, at) VALUES (?, ?)", (b"other", 2.0))
        conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)", (KEY, "sid", 1, 3.0))
    assert conn.execute("SELECT key FROM deleted").fetchall() == [(b"other",)]


def test_pruning_keeps_the_most_recent_deletes(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    with conn:
        for n in range(10):
            conn.execute("INSERT INTO deleted (key, at) VALUES (?, ?)", (bytes([n]), float(n)))
        # Deleted again (after a forgotten delete and a new life): now the newest.
        conn.execute("INSERT OR REPLACE INTO deleted (key, at) VALUES (?, ?)", (b"\x00", 99.0))
    with conn:
        assert prune_deleted(conn, 4) == 6
    left = [row[0] for row in conn.execute("SELECT key FROM deleted ORDER BY rowid")]
    assert left == [bytes([n]) for n in (7, 8, 9, 0)]
    with conn:
        assert prune_deleted(conn, 4) == 0
        assert prune_deleted(conn, 0) == 4


def test_forgetting_a_session_takes_its_turns_and_no_other(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    other = b"o" * 16
    with conn:
        for key in (KEY, other):
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (key, "sid", 2, 1.0))
            for k in range(3):
                conn.execute(WRITE_TURN, (key, *turn(k)[1:]))
    with conn:
        forget(conn, KEY)
    assert turns(conn) == []
    assert conn.execute("SELECT count(*) FROM sessions WHERE key = ?", (KEY,)).fetchone() == (0,)
    left = conn.execute("SELECT k FROM turns WHERE key = ? ORDER BY k", (other,)).fetchall()
    assert left == [(0,), (1,), (2,)]
