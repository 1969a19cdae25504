"""The journal's writer under faults, driven directly: results only after COMMIT,
a supervised writer, and mint reservations that advance only once durable."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout_sessions.journal import writer as journal_mod
from rollout_sessions.journal.db import DB_NAME, get_meta
from rollout_sessions.journal.writer import Journal
from rollout_sessions.web.errors import ApiError

KEY = b"k" * 16


@pytest.fixture
def jrn(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path)
    j.load(16, 0, lambda done, total: None)
    j.save_start(b"s" * 32, 0, 0)
    yield j


def on_disk(path: Path, name: str) -> bytes | None:
    with sqlite3.connect(path / DB_NAME) as conn:
        return get_meta(conn, name)


def run(j: Journal, body) -> None:
    async def main() -> None:
        j.start(asyncio.get_running_loop())
        try:
            await body()
        finally:
            await j.close()

    asyncio.run(main())


def test_a_failed_commit_fails_every_write_in_it(jrn: Journal, tmp_path: Path) -> None:
    """A COMMIT that fails (here: refused by a commit hook, as a full disk
    refuses it) settles no write as done, not even when retried alone."""

    async def body() -> None:
        refuse = True
        fail_commits_while(jrn._conn, lambda: refuse)
        futures = [jrn.create(bytes([n]) * 16, f"s{n}", "by_id") for n in range(3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, ApiError) and r.status == 503 for r in results), results
        assert jrn.failure is not None  # nothing could be committed: /health says so
        refuse = False
        await jrn.create(KEY, "later", "by_id")
        assert jrn.failure is None

    run(jrn, body)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        sids = [row[0] for row in conn.execute("SELECT sid FROM sessions")]
    assert sids == ["later"]


def fail_commits_while(conn: sqlite3.Connection, refuse) -> None:
    """Every COMMIT fails while ``refuse()``, after the transaction's statements
    ran, as SQLite fails it on a full disk (an authorizer denies the COMMIT)."""

    def authorizer(action: int, arg1, arg2, dbname, source) -> int:
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" and refuse():
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    conn.set_authorizer(authorizer)


def test_an_unexpected_exception_fails_its_operation_and_the_writer_goes_on(
    jrn: Journal,
) -> None:
    async def body() -> None:
        def broken(conn: sqlite3.Connection) -> None:
            raise KeyError("a damaged row")

        bad = jrn._submit(broken)
        good = jrn.create(KEY, "fine", "by_id")
        with pytest.raises(ApiError) as err:
            await bad
        assert err.value.status == 503 and "KeyError" in err.value.message
        await good  # the rest of the batch commits
        assert jrn.failure is None
        await jrn.create(b"x" * 16, "after", "by_id")  # and the writer is still there

    run(jrn, body)


class ReservationDisk:
    """Mint reservations of 8 ids whose writes fail while ``broken``."""

    broken = True


@pytest.fixture
def disk(jrn: Journal, monkeypatch: pytest.MonkeyPatch) -> ReservationDisk:
    monkeypatch.setattr(journal_mod, "MINT_BLOCK", 8)
    jrn.mint_reserved = 8  # as save_start leaves it with this block size
    state = ReservationDisk()
    real_set_meta = journal_mod.set_meta

    def set_meta(conn: sqlite3.Connection, name: str, value: bytes) -> None:
        if state.broken and name == "mint_reserved":
            raise sqlite3.OperationalError("disk I/O error")
        real_set_meta(conn, name, value)

    monkeypatch.setattr(journal_mod, "set_meta", set_meta)
    return state


def test_mints_stop_until_their_reservation_is_durable(
    jrn: Journal, tmp_path: Path, disk: ReservationDisk
) -> None:
    handed: list[int] = []

    async def body() -> None:
        counter = 0
        with pytest.raises(ApiError):
            while True:
                pending = jrn.reserve_mints(counter)
                if pending is not None:
                    await pending
                    continue
                handed.append(counter)
                counter += 1
                await asyncio.sleep(0)
        assert jrn.mint_reserved == 8  # never raised by a write that failed
        disk.broken = False
        while (pending := jrn.reserve_mints(counter)) is not None:
            await pending
        assert jrn.mint_reserved == 16

    run(jrn, body)
    # A restart reads the reservation: every id handed out is below it.
    assert handed == list(range(8))
    assert int(on_disk(tmp_path, "mint_reserved") or b"0") == 16


def test_a_failed_reservation_is_not_handed_to_a_minter_that_came_after_it(
    jrn: Journal, disk: ReservationDisk
) -> None:
    # The write's failure is delivered, and a minter runs before the write's own
    # callback does (later in the same loop pass): it must get a new write.
    async def body() -> None:
        first = jrn.reserve_mints(8)
        assert first is not None
        await asyncio.sleep(0)  # handed to the writer
        time.sleep(1.0)  # the loop blocked: the writer fails it, its answer queued
        disk.broken = False
        await asyncio.sleep(0)  # queued after the answer, before the write's callback
        assert first.done()
        second = jrn.reserve_mints(8)
        assert second is not None and second is not first
        await second
        assert jrn.mint_reserved == 16
        with pytest.raises(ApiError):
            await first

    run(jrn, body)
