"""Group commit: what the writer thread takes into one transaction."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout_sessions.journal import writer as journal
from rollout_sessions.journal.writer import Journal, _Op


def ops(n: int) -> list[_Op]:
    return [_Op(lambda conn: None, None) for _ in range(n)]


@pytest.fixture
def jrn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Journal]:
    monkeypatch.setattr(journal, "LINGER_S", 3.0)  # long: a wait shows, a skipped one too
    j = Journal(tmp_path)
    yield j
    asyncio.run(j.close())  # never started: closes the database and the lock


def put_later(j: Journal, batch: list[_Op] | None, delay: float = 0.3) -> threading.Timer:
    timer = threading.Timer(delay, j._queue.put, (batch,))
    timer.start()
    return timer


def test_without_linger_a_batch_is_what_is_queued(jrn: Journal) -> None:
    jrn._queue.put(ops(2))
    late = put_later(jrn, ops(3))
    started = time.monotonic()
    batch, closing = jrn._gather(ops(1), linger=False)
    assert (len(batch), closing) == (3, False)
    assert time.monotonic() - started < 0.25
    late.join()


def test_lingering_takes_the_next_pass_in_the_same_commit(jrn: Journal) -> None:
    late = put_later(jrn, ops(3))
    started = time.monotonic()
    batch, closing = jrn._gather(ops(2), linger=True)
    assert (len(batch), closing) == (5, False)
    assert time.monotonic() - started < 2.0  # woken by the put, not by LINGER_S
    late.join()


def test_a_full_enough_batch_does_not_wait(jrn: Journal) -> None:
    late = put_later(jrn, ops(3))
    batch, _ = jrn._gather(ops(journal.LINGER_UNTIL), linger=True)
    assert len(batch) == journal.LINGER_UNTIL
    late.join()


def test_a_batch_stops_growing_at_max_batch(jrn: Journal) -> None:
    jrn._queue.put(ops(journal.MAX_BATCH))
    jrn._queue.put(ops(1))
    batch, _ = jrn._gather(ops(1), linger=True)
    assert len(batch) == journal.MAX_BATCH + 1  # each loop pass's list stays whole
    assert len(jrn._gather([], linger=False)[0]) == 1  # the rest: the next commit


def test_lingering_waits_once(jrn: Journal) -> None:
    late = [put_later(jrn, ops(1), 0.05), put_later(jrn, ops(1), 1.5)]
    batch, _ = jrn._gather(ops(1), linger=True)
    assert len(batch) == 2  # one wait: the second late put is for the next commit
    for timer in late:
        timer.join()
    assert len(jrn._gather([], linger=False)[0]) == 1


def test_the_close_sentinel_ends_a_lingering_gather(jrn: Journal) -> None:
    late = put_later(jrn, None)
    batch, closing = jrn._gather(ops(2), linger=True)
    assert (len(batch), closing) == (2, True)
    late.join()
