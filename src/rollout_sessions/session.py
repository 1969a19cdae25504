"""Per-session state: the trajectory of one conversation.

An idle session (created, never chatted) must stay tiny: at 1M sessions the
budget is 300 bytes each, registry included. So every container and the lock
are created lazily, on the first chat turn.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import Any


class Session:
    __slots__ = ("_lock", "closing", "messages", "records", "checkpoints", "ends")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self.closing: bool = False
        # Created on first use; None means empty.
        self.messages: list[dict[str, Any]] | None = None
        self.records: list[dict[str, Any]] | None = None
        self.checkpoints: list[array] | None = None  # int32 token ids per turn
        # Per turn: the message index just after its generated assistant message.
        self.ends: list[int] | None = None

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
    def num_assistant(self) -> int:
        return len(self.checkpoints) if self.checkpoints else 0

    def metadata(self) -> dict[str, Any]:
        checkpoints = self.checkpoints
        return {
            "accumulated_token_ids": checkpoints[-1].tolist() if checkpoints else [],
            "num_assistant": len(checkpoints) if checkpoints else 0,
        }

    def snapshot(self, session_id: str) -> dict[str, Any]:
        """The body of ``GET /sessions/{id}``."""
        return {
            "session_id": session_id,
            "records": list(self.records) if self.records else [],
            "metadata": self.metadata(),
        }


def empty_snapshot(session_id: str) -> dict[str, Any]:
    """The answer for a never-seen id: empty, and nothing is created."""
    return {"session_id": session_id, "records": [], "metadata": {}}
