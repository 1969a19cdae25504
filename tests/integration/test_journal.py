"""The journal over real HTTP: ``serve`` killed with SIGKILL and started again on the
same ``DATA_DIR`` loses nothing it answered."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import ServerProc, serve

MSG = [{"role": "user", "content": "hello"}]


def start(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProc:
    return serve("--data-dir", str(data_dir), *flags, env=env)


def killed(srv: ServerProc) -> None:
    srv.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    srv.cleanup()


def chat(srv: ServerProc, sid: str, messages: list[dict]):
    return srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": messages})


def converse(srv: ServerProc, sid: str, turns: int) -> list[dict]:
    messages = list(MSG)
    for turn in range(turns):
        resp = chat(srv, sid, messages)
        assert resp.status_code == 200, resp.text
        answer = resp.json()["choices"][0]["message"]
        messages = [*messages, answer, {"role": "tool", "content": f"result {turn}"}]
    return messages


def test_kill_9_loses_nothing_answered(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    minted = srv.post("/sessions").json()["session_id"]
    idle = srv.post("/sessions").json()["session_id"]
    gone_minted = srv.post("/sessions").json()["session_id"]
    assert srv.post("/sessions", json={"session_id": "by-id-1"}).status_code == 200
    assert srv.post("/sessions", json={"session_id": "gone-foreign"}).status_code == 200
    messages = converse(srv, minted, 3)
    converse(srv, "auto-1", 2)
    for sid in (gone_minted, "gone-foreign"):
        assert srv.delete(f"/sessions/{sid}").status_code == 204
    last = chat(srv, "by-id-1", MSG)  # answered just before the kill
    assert last.status_code == 200
    before = {sid: srv.get(f"/sessions/{sid}").json() for sid in (minted, "auto-1", "by-id-1")}
    samples = srv.post(
        f"/sessions/{minted}/samples", json={}, headers={"Accept": "application/json"}
    )
    killed(srv)

    again = start(data)
    try:
        for sid, session in before.items():
            assert again.get(f"/sessions/{sid}").json() == session  # records identical
        assert (
            again.post(
                f"/sessions/{minted}/samples", json={}, headers={"Accept": "application/json"}
            ).json()
            == samples.json()
        )
        # A minted id from before is still live (and still ours: it routes by its tag).
        assert again.get(f"/sessions/{idle}").json()["metadata"]["num_assistant"] == 0
        assert again.post("/sessions", json={"session_id": idle}).status_code == 409
        # Deleted ids, minted and foreign, are still deleted.
        for sid in (gone_minted, "gone-foreign"):
            assert again.get(f"/sessions/{sid}").status_code == 404
            assert chat(again, sid, MSG).status_code == 404
            assert again.post("/sessions", json={"session_id": sid}).status_code == 404
        # The minted one needs no tombstone: only the foreign one is in the ring.
        assert "rollout_sessions_tombstones 1.0" in again.get("/metrics").text
        # Chat continues the trajectory.
        resp = chat(again, minted, messages)
        assert resp.status_code == 200
        session = again.get(f"/sessions/{minted}").json()
        assert session["metadata"]["num_assistant"] == 4
        prev = before[minted]["metadata"]["accumulated_token_ids"]
        assert session["metadata"]["accumulated_token_ids"][: len(prev)] == prev
        # New mints never repeat an old id.
        assert again.post("/sessions").json()["session_id"] not in (minted, idle, gone_minted)
    finally:
        again.cleanup()


def test_the_stricter_sync_keeps_turns_and_checkpoints_too(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--journal-sync", "full")
    sid = srv.post("/sessions").json()["session_id"]
    converse(srv, sid, 3)
    before = srv.get(f"/sessions/{sid}").json()
    wal = data / "journal.sqlite3-wal"
    deadline = time.monotonic() + 10
    while wal.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.2)  # writes paused: the checkpointer empties the WAL
    assert wal.stat().st_size == 0
    killed(srv)
    again = start(data)
    try:
        assert again.get(f"/sessions/{sid}").json() == before
    finally:
        again.cleanup()


def test_a_retried_turn_replaces_the_last_one_on_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    sid = srv.post("/sessions").json()["session_id"]
    messages = converse(srv, sid, 3)
    retry = chat(srv, sid, messages[:-2])  # the third turn again
    assert retry.status_code == 200, retry.text
    before = srv.get(f"/sessions/{sid}").json()
    assert len(before["records"]) == 3
    killed(srv)
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 3
    again = start(data)
    try:
        assert again.get(f"/sessions/{sid}").json() == before
        assert chat(again, sid, messages).status_code == 200  # and it goes on from there
        assert len(again.get(f"/sessions/{sid}").json()["records"]) == 4
    finally:
        again.cleanup()


def test_journal_off_remembers_nothing_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--no-journal")
    sid = srv.post("/sessions").json()["session_id"]
    converse(srv, sid, 1)
    assert srv.delete(f"/sessions/{sid}").status_code == 204
    assert "journal off" in srv.log()
    killed(srv)
    assert not data.exists()
    again = start(data, env={"ROLLOUT_SESSIONS_JOURNAL": "off"})
    try:
        assert again.get(f"/sessions/{sid}").json()["metadata"] == {}  # never seen
    finally:
        again.cleanup()
    assert not data.exists()


def disk(data: Path) -> int:
    return sum(f.stat().st_size for f in data.glob("journal.sqlite3*") if f.name[-4:] != "-shm")


@pytest.mark.slow
def test_deleting_frees_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    try:
        sids = [srv.post("/sessions").json()["session_id"] for _ in range(30)]
        big = "x" * 20_000
        for sid in sids:
            resp = chat(srv, sid, [{"role": "user", "content": big + sid}])
            assert resp.status_code == 200
        time.sleep(3)  # a maintenance pass truncates the WAL
        full = disk(data)
        for sid in sids:
            assert srv.delete(f"/sessions/{sid}").status_code == 204
        deadline = time.monotonic() + 15
        while disk(data) > full / 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert disk(data) <= full / 3, (full, disk(data))
    finally:
        srv.cleanup()


@pytest.mark.slow
def test_expired_sessions_leave_the_journal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--session-ttl-s", "1")
    sid = srv.post("/sessions").json()["session_id"]
    converse(srv, sid, 1)
    time.sleep(3)  # evicted by housekeeping
    assert srv.get(f"/sessions/{sid}").status_code == 404  # ours and gone
    time.sleep(2.5)  # the expiry is written behind
    killed(srv)
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 0


@pytest.mark.slow
def test_a_session_that_expires_during_its_turn_stays_gone(tmp_path: Path, echo_factory) -> None:
    slow = echo_factory(latency_ms=3000)  # longer than the idle TTL
    data = tmp_path / "data"
    srv = start(data, "--session-ttl-s", "1", "--upstream", slow.url)
    sid = srv.post("/sessions").json()["session_id"]
    assert chat(srv, sid, MSG).status_code == 200  # answered, not recorded
    assert srv.get(f"/sessions/{sid}").status_code == 404  # minted, expired: gone
    killed(srv)
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 0
    again = start(data, "--session-ttl-s", "1", "--upstream", slow.url)
    try:
        assert again.get(f"/sessions/{sid}").status_code == 404  # not brought back
    finally:
        again.cleanup()


@pytest.mark.slow
def test_idle_clocks_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--session-ttl-s", "4")
    assert srv.post("/sessions", json={"session_id": "old"}).status_code == 200
    time.sleep(2.5)
    killed(srv)
    again = start(data, "--session-ttl-s", "4")
    try:
        assert again.post("/sessions", json={"session_id": "fresh"}).status_code == 200
        time.sleep(2.5)  # "old" has now been idle > 4 s in all, "fresh" 2.5 s
        assert again.get("/sessions/old").json()["metadata"] == {}  # expired: never seen again
        assert again.get("/sessions/fresh").json()["metadata"]["num_assistant"] == 0
    finally:
        again.cleanup()


def test_a_full_journal_is_507_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data, "--journal-max-bytes", str(1 << 20))
    try:
        sid = srv.post("/sessions").json()["session_id"]
        assert chat(srv, sid, MSG).status_code == 200
        before = srv.get(f"/sessions/{sid}").json()
        huge = [*MSG, before["records"][0]["response"]["choices"][0]["message"]]
        huge.append({"role": "tool", "content": "y" * (3 << 20)})
        resp = chat(srv, sid, huge)
        assert resp.status_code == 507
        assert resp.json()["error"].startswith("journal full")
        assert srv.get(f"/sessions/{sid}").json() == before
        assert srv.post("/sessions", json={"session_id": "still-room"}).status_code == 200
    finally:
        srv.cleanup()


def test_a_second_server_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(data)
    try:
        with pytest.raises(RuntimeError) as err:
            start(data)
        assert "is in use by another server" in str(err.value)
    finally:
        first.cleanup()


@pytest.mark.parametrize("kind", ["corrupt", "foreign-db", "stray-file"])
def test_a_bad_data_dir_is_refused_and_nothing_is_deleted(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if kind == "corrupt":
        bad = data / "journal.sqlite3"
        bad.write_bytes(b"this is not a database" * 100)
    elif kind == "foreign-db":
        bad = data / "journal.sqlite3"
        with sqlite3.connect(bad) as conn:
            conn.execute("CREATE TABLE t (x)")
    else:
        bad = data / "notes.txt"
        bad.write_text("mine")
    content = bad.read_bytes()
    with pytest.raises(RuntimeError) as err:
        start(data)
    assert str(bad) in str(err.value)
    assert bad.read_bytes() == content


@pytest.mark.slow
def test_disk_use_is_near_the_raw_records(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start(data)
    try:
        raw = 0
        for n in range(10):
            sid = f"d-{n}"
            converse(srv, sid, 4)
            raw += len(json.dumps(srv.get(f"/sessions/{sid}").json()["records"]))
        time.sleep(3)
        assert disk(data) <= 1.5 * raw + (256 << 10), (disk(data), raw)
    finally:
        srv.cleanup()
