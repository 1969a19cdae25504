"""The ``Sessions`` service driven without HTTP: its durability rules, each once.

Journal first: a create, delete or turn whose journal write fails leaves the
session exactly as it was, in memory and (after a restart) on disk. Delete
sticks, for minted and foreign ids, across a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rollout_sessions.config import Settings
from rollout_sessions.registry import DELETED, NEVER_SEEN
from rollout_sessions.sessions.service import CLOSING, RECORDED, STALE, Change, Sessions
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web.errors import ApiError


def settings(data: Path, **kw: Any) -> Settings:
    return dataclasses.replace(Settings(), data_dir=str(data), **kw)


def turn_of(n: int, sid: str = "kept") -> Callable[[Trajectory], Change]:
    """A first turn of ``sid``: prompt [1, 2], completion [n]."""

    def prepare(traj: Trajectory) -> Change:
        write = traj.prepare(
            keep=0,
            exact=0,
            message_bytes=[b'{"role":"user","content":"hi"}'],
            assistant=b'{"role":"assistant","content":"%d"}' % n,
            rest=b'"model":"m"',
            with_input_ids=False,
            prompt=array("i", [1, 2]),
            completion=array("i", [n]),
            logprobs=array("f", [-0.5]),
            answer=b'{"choices":[{"prompt_token_ids":}]}',
            cut=len(b'{"choices":[{"prompt_token_ids":'),
            timestamps=(2.0, 1.0),
        )
        return Sessions.linear_change(sid, traj, write)

    return prepare


def failing_commits(sessions: Sessions) -> Callable[[bool], None]:
    """Make every journal COMMIT fail (as on a full disk) while switched on."""
    state = {"on": False}

    def authorizer(action: int, arg1: Any, *rest: Any) -> int:
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" and state["on"]:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    assert sessions.journal is not None
    sessions.journal._conn.set_authorizer(authorizer)
    return lambda on: state.update(on=on)


def serve(sessions: Sessions, body: Callable[[], Any]) -> None:
    async def main() -> None:
        if sessions.journal is not None:
            sessions.journal.start(asyncio.get_running_loop())
        try:
            await body()
        finally:
            if sessions.journal is not None:
                await sessions.journal.close()

    asyncio.run(main())


def test_nothing_changes_when_the_journal_refuses(tmp_path: Path) -> None:
    sessions = Sessions.open(settings(tmp_path))
    fail = failing_commits(sessions)
    kept: dict[str, Any] = {}

    async def body() -> None:
        await sessions.create("kept")
        live = sessions.lookup("kept")
        assert await sessions.record("kept", live, 0, turn_of(7)) == RECORDED
        fail(True)
        with pytest.raises(ApiError):
            await sessions.create("refused")
        assert sessions.lookup("refused") is NEVER_SEEN
        with pytest.raises(ApiError):
            await sessions.mint()
        with pytest.raises(ApiError):
            await sessions.record("kept", live, 1, turn_of(8))
        assert live.traj.num_turns == 1 and list(live.traj.tokens) == [1, 2, 7]
        with pytest.raises(ApiError):
            await sessions.delete("kept")
        assert sessions.lookup("kept") is live and not live.closing
        fail(False)
        kept["minted"] = await sessions.mint()

    serve(sessions, body)
    again = Sessions.open(settings(tmp_path))
    assert list(again.lookup("kept").traj.tokens) == [1, 2, 7]
    assert again.lookup("refused") is NEVER_SEEN
    assert again.lookup(kept["minted"]) is not NEVER_SEEN


def test_delete_sticks_across_a_restart(tmp_path: Path) -> None:
    sessions = Sessions.open(settings(tmp_path))
    ids: dict[str, str] = {}

    async def body() -> None:
        ids["minted"] = await sessions.mint()
        await sessions.create("foreign")
        for sid in (ids["minted"], "foreign"):
            await sessions.delete(sid)
            with pytest.raises(ApiError) as err:
                await sessions.delete(sid)
            assert err.value.status == 404
        with pytest.raises(ApiError) as err:
            await sessions.create("foreign")
        assert err.value.status == 404

    serve(sessions, body)
    again = Sessions.open(settings(tmp_path))
    for sid in (ids["minted"], "foreign"):
        assert again.lookup(sid) is DELETED
    with sqlite3.connect(tmp_path / "journal.sqlite3") as conn:  # only the foreign id's row
        assert conn.execute("SELECT count(*) FROM deleted").fetchone() == (1,)


def test_a_turn_is_not_recorded_for_a_closing_session_or_a_stale_plan() -> None:
    sessions = Sessions.open(Settings(journal=False))

    async def body() -> None:
        session = sessions.auto_create("auto")
        assert await sessions.record("auto", session, 0, turn_of(1, "auto")) == RECORDED
        assert await sessions.record("auto", session, 0, turn_of(2, "auto")) == STALE
        await sessions.delete("auto")
        assert await sessions.record("auto", session, 1, turn_of(3, "auto")) == CLOSING
        assert session.traj.num_turns == 1
        with pytest.raises(ApiError) as err:
            sessions.live_for_turn("auto")
        assert err.value.status == 404

    serve(sessions, body)


def test_a_bad_id_is_400_wherever_it_enters() -> None:
    sessions = Sessions.open(Settings(journal=False))

    async def body() -> None:
        for call in (
            lambda: sessions.create("a/b"),
            lambda: sessions.delete("a/b"),
        ):
            with pytest.raises(ApiError) as err:
                await call()
            assert err.value.status == 400
        with pytest.raises(ApiError) as err:
            sessions.lookup("x" * 129)
        assert err.value.status == 400

    serve(sessions, body)
