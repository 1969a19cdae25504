"""The journal's promise under faults, over real sockets: a full disk, a writer
fault, ``kill -9`` and restarts with changed settings.

The promise: a turn, create or delete answered 2xx is on disk, and one that
was refused (507 for lack of space, 503 for any other journal failure)
changed nothing, in memory or on disk.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProc
from smalldisk import SmallDisk
from test_journal import chat, killed, start

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "fs", 1 << 20)
    yield disk
    disk.close()


def filler(n: int, size: int = 48_000) -> str:
    # Incompressible enough: the journal keeps messages as they came.
    return "".join(f"{(n * 7919 + i * 104729) % 1_000_003:07d}" for i in range(size // 7))


class Conversation:
    """One session's answered turns, as the client saw them."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.messages: list[dict] = list(MSG)
        self.answered = 0

    def turn(self, srv: ServerProc, n: int) -> int:
        messages = [*self.messages, {"role": "tool", "content": filler(n)}]
        if self.answered == 0:
            messages = [{"role": "user", "content": filler(n)}]
        resp = chat(srv, self.sid, messages)
        if resp.status_code == 200:
            answer = resp.json()["choices"][0]["message"]
            self.messages = [*messages, answer]
            self.answered += 1
        return resp.status_code


def health(srv: ServerProc) -> int:
    return srv.get("/health").status_code


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def records_of(srv: ServerProc, sid: str) -> list[dict]:
    resp = srv.get(f"/sessions/{sid}")
    assert resp.status_code == 200, resp.text
    return resp.json()["records"]


def check_restored(srv: ServerProc, talks: list[Conversation], deleted: list[str]) -> None:
    for talk in talks:
        records = records_of(srv, talk.sid)
        assert len(records) == talk.answered, talk.sid
        if talk.answered:
            sent = records[-1]["request"]["messages"]
            assert sent == talk.messages[:-1]
            assert records[-1]["response"]["choices"][0]["message"] == talk.messages[-1]
    for sid in deleted:
        assert srv.get(f"/sessions/{sid}").status_code == 404, sid


def test_a_full_disk_answers_nothing_it_did_not_commit(small_disk: SmallDisk) -> None:
    data = small_disk.path / "data"
    srv = start(data)
    small_disk.attach(srv.pid)
    minted = [srv.post("/sessions").json()["session_id"] for _ in range(3)]
    for sid in ("by-id-0", "by-id-1"):
        assert srv.post("/sessions", json={"session_id": sid}).status_code == 200
    talks = [Conversation(sid) for sid in [*minted, "by-id-0", "by-id-1", "auto-0", "auto-1"]]
    refused = 0
    deleted: list[str] = []
    statuses: set[int] = set()
    for n in range(120):
        talk = talks[n % len(talks)]
        status = talk.turn(srv, n)
        statuses.add(status)
        assert status in (200, small_disk.full_status), status
        if status != 200:
            refused += 1
            if refused == 1:
                assert health(srv) == 503
                body = srv.get("/health").json()
                assert body["error"].startswith("journal cannot write")
        if refused >= 20:
            break
    assert refused >= 20 and 200 in statuses, (refused, statuses)
    # A delete on the full disk is refused and changes nothing either.
    victim = talks[0]
    resp = srv.delete(f"/sessions/{victim.sid}")
    assert resp.status_code in (204, small_disk.full_status)
    if resp.status_code == 204:
        deleted.append(victim.sid)
        talks.remove(victim)
    check_restored(srv, talks, deleted)  # memory: exactly what was answered

    killed(srv)
    small_disk.grow()
    srv = start(data)
    try:
        check_restored(srv, talks, deleted)  # disk: exactly what was answered
        # Space is back: every session is journaled again, the ones refused too.
        for n, talk in enumerate(talks):
            assert talk.turn(srv, 1000 + n) == 200
        gone = talks.pop()
        assert srv.delete(f"/sessions/{gone.sid}").status_code == 204
        deleted.append(gone.sid)
    finally:
        killed(srv)
    srv = start(data)
    try:
        check_restored(srv, talks, deleted)
    finally:
        srv.cleanup()


def test_health_recovers_once_space_comes_back(small_disk: SmallDisk) -> None:
    srv = start(small_disk.path / "data")
    small_disk.attach(srv.pid)
    try:
        talk = Conversation("fills-the-disk")
        for n in range(100):
            if talk.turn(srv, n) != 200:
                break
        else:
            pytest.fail("the disk never filled")
        assert health(srv) == 503
        small_disk.grow()
        # Nobody writes: the writer probes until a commit works again.
        assert wait_for(lambda: health(srv) == 200), srv.get("/health").text
        assert talk.turn(srv, 999) == 200
    finally:
        srv.cleanup()


def test_a_writer_fault_fails_that_operation_and_the_writer_goes_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    try:
        assert chat(srv, "damaged", MSG).status_code == 200
        assert chat(srv, "healthy", MSG).status_code == 200
    finally:
        srv.stop()
    with sqlite3.connect(data / "journal.sqlite3") as conn:  # logprobs of a wrong length
        key = conn.execute("SELECT key FROM sessions WHERE sid = 'damaged'").fetchone()[0]
        conn.execute("UPDATE turns SET logprobs = x'010203' WHERE key = ?", (key,))
    srv = start(data)
    try:
        resp = srv.post(
            "/sessions/damaged/samples", json={}, headers={"Accept": "application/json"}
        )
        assert resp.status_code == 503, resp.text
        assert "ValueError" in resp.json()["error"]
        # The writer is still there: every other session answers, health too.
        assert srv.post("/sessions/healthy/samples", json={}).status_code == 200
        assert chat(srv, "healthy", MSG).status_code == 200
        assert srv.post("/sessions").status_code == 200
        assert srv.delete("/sessions/damaged").status_code == 204
        assert health(srv) == 200
    finally:
        srv.cleanup()


def test_a_smaller_tombstone_ring_at_restart_keeps_a_session_created_again(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    srv = start(data, "--tombstone-capacity", "4")
    try:
        for n in range(6):
            assert srv.post("/sessions", json={"session_id": f"old-{n}"}).status_code == 200
            assert srv.delete(f"/sessions/old-{n}").status_code == 204
    finally:
        srv.stop()
    srv = start(data, "--tombstone-capacity", "2")
    try:
        for n in (4, 5):  # what the smaller ring holds
            assert srv.get(f"/sessions/old-{n}").status_code == 404
        # old-2 is beyond the ring now: it may live again, and what it answers stays.
        assert srv.post("/sessions", json={"session_id": "old-2"}).status_code == 200
        first = chat(srv, "old-2", MSG)
        assert first.status_code == 200
    finally:
        killed(srv)
    srv = start(data, "--tombstone-capacity", "2")
    try:
        records = records_of(srv, "old-2")
        assert len(records) == 1
        assert records[0]["response"] == first.json()
        assert srv.get("/sessions/old-5").status_code == 404
    finally:
        srv.cleanup()


def refused_start(data: Path, *flags: str) -> ManagedProcess:
    """``serve`` expected to refuse to start: its exit code and log."""
    port = free_port()
    proc = ManagedProcess(serve_argv(port, "--data-dir", str(data), *flags), port)
    try:
        proc.proc.wait(30)
    except Exception:
        proc.cleanup()
        raise
    return proc


def assert_refused(proc: ManagedProcess, *words: str) -> None:
    log = proc.log()
    proc.cleanup()
    assert proc.proc.returncode == 2, log
    assert "cannot start" in log, log
    assert "Traceback" not in log, log
    for word in words:
        assert word in log, log


def test_an_empty_database_beside_a_wal_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    minted = srv.post("/sessions").json()["session_id"]
    assert srv.delete(f"/sessions/{minted}").status_code == 204
    killed(srv)  # at once: the WAL still holds the commits
    wal = data / "journal.sqlite3-wal"
    assert wal.stat().st_size > 0
    (data / "journal.sqlite3").write_bytes(b"")
    before = wal.read_bytes()
    assert_refused(refused_start(data), "write-ahead log")
    assert wal.read_bytes() == before  # nothing discarded


def test_another_instance_tag_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--instance-tag", "3")
    minted = srv.post("/sessions").json()["session_id"]
    assert srv.delete(f"/sessions/{minted}").status_code == 204
    srv.stop()
    assert_refused(refused_start(data, "--instance-tag", "4"), "instance tag 3")
    srv = start(data, "--instance-tag", "3")
    try:
        assert srv.get(f"/sessions/{minted}").status_code == 404  # still recognised
    finally:
        srv.cleanup()


def test_damaged_rows_at_start_up_are_a_clear_refusal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    assert chat(srv, "s", MSG).status_code == 200
    srv.stop()
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        conn.execute("UPDATE turns SET head = x'7b7b'")  # not the JSON head of a turn
    assert_refused(refused_start(data), "cannot be read back")


def test_a_full_disk_at_start_up_is_a_clear_refusal(small_disk: SmallDisk) -> None:
    if not small_disk.mounted:
        pytest.fail("needs root for a real small filesystem (tmpfs)")
    data = small_disk.path / "data"
    data.mkdir()
    (small_disk.path / "ballast").write_bytes(b"\0" * ((1 << 20) - 4096))
    assert_refused(refused_start(data), "no space left")


def test_the_data_dir_is_held_by_an_os_lock_not_the_lock_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(data)
    try:
        (data / "LOCK").unlink()
        proc = refused_start(data)
        log = proc.log()
        proc.cleanup()
        assert proc.proc.returncode == 2, log
        assert "is in use by another server" in log
        assert first.post("/sessions").status_code == 200
    finally:
        first.send_signal(signal.SIGTERM)
        first.cleanup()
