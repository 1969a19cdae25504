"""The checkpointer: under continuous writes (a commit every millisecond or
so) the WAL stays bounded without the writer ever checkpointing (and so
without stopping for it); once writes pause, the WAL file is emptied."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from test_journal_db import KEY, WRITE_TURN

from rollout_sessions.journal import db as journal_db
from rollout_sessions.journal import writer as journal
from rollout_sessions.journal.db import DB_NAME, open_db

BLOB = os.urandom(64 * 1024)  # incompressible, like the journal's answers
COMMITS = 400  # ~26 MiB through the WAL


def wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def journal_with_a_session(path: Path) -> sqlite3.Connection:
    """A fresh journal holding the row of session ``KEY``, for its turns."""
    conn = open_db(path, "normal", None)
    with conn:
        conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (KEY, "sid", 2, 1.0))
    return conn


def write_continuously(path: Path, checkpointer: journal.Checkpointer | None) -> int:
    """Commit ``COMMITS`` turns, one every millisecond or so; the largest WAL size seen."""
    conn = journal_with_a_session(path)
    if checkpointer is not None:
        checkpointer.start()
    largest = 0
    try:
        for i in range(COMMITS):
            with conn:  # a turn that replaces the last: the database stays small
                conn.execute(WRITE_TURN, (KEY, 0, b"h", b"r", BLOB, b"s", str(i).encode(), b"l"))
            largest = max(largest, wal_bytes(path))
            time.sleep(0.001)  # the writer waits for the next batch
    finally:
        if checkpointer is not None:
            checkpointer.stop()
    answer = conn.execute("SELECT answer FROM turns WHERE key = ?", (KEY,)).fetchone()[0]
    assert answer == str(COMMITS - 1).encode()  # every commit kept, the last one last
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()
    return largest


@pytest.fixture
def small_wal(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 1 MiB WAL limit, checkpoints every 20 ms, the writer's own automatic
    checkpoint out of reach: what keeps the WAL short is the checkpointer."""
    limit = 1 << 20
    monkeypatch.setattr(journal_db, "WAL_LIMIT_BYTES", limit)
    monkeypatch.setattr(journal_db, "WAL_AUTOCHECKPOINT_PAGES", 1 << 30)
    monkeypatch.setattr(journal, "CHECKPOINT_EVERY_S", 0.02)
    return limit


def test_without_a_checkpointer_the_wal_keeps_growing(tmp_path: Path, small_wal: int) -> None:
    largest = write_continuously(tmp_path / DB_NAME, None)
    assert largest > COMMITS * len(BLOB)  # the baseline the next test must beat


def test_the_checkpointer_keeps_the_wal_bounded_under_continuous_writes(
    tmp_path: Path, small_wal: int
) -> None:
    path = tmp_path / DB_NAME
    largest = write_continuously(path, journal.Checkpointer(path, "normal"))
    # Cut back to the limit each time it starts over; between two checkpoints
    # it grows by what is written meanwhile (a few MiB here at most).
    assert largest < COMMITS * len(BLOB) // 4, largest


def test_once_writes_pause_the_wal_file_is_emptied(tmp_path: Path, small_wal: int) -> None:
    path = tmp_path / DB_NAME
    conn = journal_with_a_session(path)
    checkpointer = journal.Checkpointer(path, "normal")
    checkpointer.start()
    try:
        for i in range(8):
            with conn:
                conn.execute(WRITE_TURN, (KEY, i, b"h", b"r", BLOB, b"s", b"a", b"l"))
        assert wal_bytes(path) > 0
        deadline = time.monotonic() + 5
        while wal_bytes(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wal_bytes(path) == 0  # given back to the filesystem, not kept for reuse
    finally:
        checkpointer.stop()
    assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 8
    conn.close()
