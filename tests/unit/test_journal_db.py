"""The journal's schema: a turn is one statement, its triggers do the rest."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from rollout_sessions.journal_db import DB_NAME, forget, open_db

KEY = b"k" * 16
WRITE_TURN = "INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def turn(k: int, head: bytes = b"h") -> tuple:
    return (KEY, k, head, b"rest", b"messages", b"suffix", b"answer", b"logprobs")


def turns(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
    return conn.execute("SELECT k, head FROM turns WHERE key = ? ORDER BY k", (KEY,)).fetchall()


def test_a_turn_of_a_session_without_a_row_is_not_written(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_NAME, "normal", None)
    with conn:  # deleted or expired while its turn was in flight
        conn.execute(WRITE_TURN, turn(0))
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
        "DROP TRIGGER turn_of_a_live_session; DROP TRIGGER turn_written; "
        "DROP TRIGGER session_forgotten;"
    )
    conn.close()
    conn = open_db(path, "normal", None)
    names = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    }
    assert names == {"turn_of_a_live_session", "turn_written", "session_forgotten"}


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
