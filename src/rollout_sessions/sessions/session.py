"""Per-session state: its lock, whether it is closing, and its trajectory.

An idle session (created, never chatted) must stay tiny: at 1M sessions the
budget is 300 bytes each, registry included. So the lock and the trajectory
store are created lazily, on the first chat turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from rollout_sessions.trajectory.store import Trajectory, ids_json


class Session:
    __slots__ = ("_lock", "closing", "traj")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self.closing: bool = False
        self.traj: Trajectory | None = None  # created by the first recorded turn

    @property
    def lock(self) -> asyncio.Lock:
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        return lock

    @property
    def lock_if_any(self) -> asyncio.Lock | None:
        """The lock if a turn ever took it (an idle session has none)."""
        return self._lock

    @property
    def trajectory(self) -> Trajectory:
        traj = self.traj
        if traj is None:
            traj = self.traj = Trajectory()
        return traj


def metadata(
    traj: Trajectory | None, max_trim_tokens: int = 0, extra: dict[str, Any] | None = None
) -> bytes:
    """The ``metadata`` of ``GET /sessions/{id}`` for a live session, as JSON
    (``extra``: more keys, e.g. ``tito_mismatch``)."""
    tokens = ids_json(traj.tokens) if traj is not None else b"[]"
    return orjson.dumps(
        {
            "accumulated_token_ids": orjson.Fragment(tokens),
            "num_assistant": traj.num_turns if traj is not None else 0,
            "max_trim_tokens": max_trim_tokens,
            **(extra or {}),
        }
    )


def empty_snapshot(session_id: str) -> dict[str, Any]:
    """The answer for a never-seen id: empty, and nothing is created."""
    return {"session_id": session_id, "records": [], "metadata": {}}
