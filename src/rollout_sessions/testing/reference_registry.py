"""Pure-Python reference registry with the production PR's semantics.

This is the baseline every registry benchmark compares against. It follows
the production session registry after the "make delete stick" PR:

- live sessions in one ``dict`` (id -> session object);
- a second ``dict`` of last-access times for sessions reached through
  get-or-create (the chat path), which is what the idle TTL applies to;
- on every auto-create, a scan over *all* of those sessions evicting the
  ones idle longer than the TTL (O(live) per auto-create);
- tombstones: a ``deque`` of the most recent ``capacity`` deleted ids plus a
  ``set`` for O(1) membership (10,000 in production);
- minted ids are ``uuid4().hex``; nothing recognises them after a delete
  except the tombstone.

The method names and outcomes match ``rollout_sessions.registry.Registry``
(mint / create / lookup / get_or_create / remove / expire / stats), so one
benchmark drives both. Outcomes are this module's own constants: compare
with ``is`` against ``reference_registry.DELETED`` etc. No locking: the
production server calls it from one asyncio thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Same meanings as rollout_sessions.registry; distinct objects on purpose.
CREATED = 0
LIVE = 1


class _Outcome:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DELETED: Any = _Outcome("DELETED")
_MISSING: Any = _Outcome("MISSING")
NEVER_SEEN: Any = _Outcome("NEVER_SEEN")

PRODUCTION_TOMBSTONE_CAPACITY = 10_000
PRODUCTION_SESSION_TTL_S = 7200.0


@dataclass
class ProductionLikeSession:
    """An idle session shaped like production's trajectory object.

    Production's session is a plain dataclass (instance ``__dict__``) whose
    lock and lists are all built when the session is created; this one is
    built the same way, so memory per idle session compares like for like.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closing: bool = False
    messages: list[Any] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    trajectory_token_ids: list[list[int]] = field(default_factory=list)
    checkpoint_message_ends: list[int] = field(default_factory=list)
    num_assistant: int = 0


class ReferenceRegistry:
    """The production PR's registry, with the project's Registry method names."""

    def __init__(
        self,
        tombstone_capacity: int = PRODUCTION_TOMBSTONE_CAPACITY,
        ttl: float = PRODUCTION_SESSION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions: dict[str, Any] = {}
        self.last_access: dict[str, float] = {}
        self.deleted_order: deque[str] = deque(maxlen=tombstone_capacity)
        self.deleted_ids: set[str] = set()
        self.capacity = tombstone_capacity
        self.ttl = ttl
        self.clock = clock
        self._counts = {
            "ttl_evictions": 0,
            "auto_creates": 0,
            "deleted_refusals": 0,
            "minted": 0,
            "created_by_id": 0,
            "deletes": 0,
        }

    # --- the Registry API -------------------------------------------------

    def mint(self, obj: Any) -> str:
        sid = uuid.uuid4().hex
        self.sessions[sid] = obj
        self._counts["minted"] += 1
        return sid

    def create(self, sid: str, obj: Any) -> int | Any:
        if sid in self.deleted_ids:
            self._counts["deleted_refusals"] += 1
            return DELETED
        if sid in self.sessions:
            return LIVE
        self.sessions[sid] = obj
        self._counts["created_by_id"] += 1
        return CREATED

    def lookup(self, sid: str) -> Any:
        obj = self.sessions.get(sid, _MISSING)
        if obj is not _MISSING:
            return obj
        if sid in self.deleted_ids:
            self._counts["deleted_refusals"] += 1
            return DELETED
        return NEVER_SEEN

    def get_or_create(self, sid: str, factory: Callable[[], Any]) -> Any:
        if sid in self.deleted_ids:
            # Explicitly deleted: never resurrect. Only never-seen ids auto-create.
            self._counts["deleted_refusals"] += 1
            return DELETED
        obj = self.sessions.get(sid, _MISSING)
        if obj is _MISSING:
            # Production runs the full idle scan before every auto-create.
            self._evict_stale()
            obj = factory()
            self.sessions[sid] = obj
            self._counts["auto_creates"] += 1
        self.last_access[sid] = self.clock()
        return obj

    def remove(self, sid: str, expected: Any = None) -> Any:
        obj = self.sessions.get(sid, _MISSING)
        if obj is _MISSING or (expected is not None and obj is not expected):
            return None
        del self.sessions[sid]
        self.last_access.pop(sid, None)
        self._tombstone(sid)
        self._counts["deletes"] += 1
        return obj

    def expire(self, budget: int = 1024) -> int:
        # Production has no separate expiry: the scan is the only eviction.
        # ``budget`` is accepted for API parity and ignored (the scan is total).
        return self._evict_stale()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "live": len(self.sessions),
            "tombstones": len(self.deleted_ids),
            "capacity": self.capacity,
            # Production keeps no delete times, so it cannot tell its horizon.
            "horizon_s": None,
            "young_overwrites": None,
        }
        out.update(self._counts)
        return out

    def is_deleted(self, sid: str) -> bool:
        return sid in self.deleted_ids

    # --- production internals ---------------------------------------------

    def _evict_stale(self) -> int:
        if not self.last_access:
            return 0
        now = self.clock()
        ttl = self.ttl
        stale = [sid for sid, ts in self.last_access.items() if now - ts > ttl]
        for sid in stale:
            self.sessions.pop(sid, None)
            del self.last_access[sid]
        self._counts["ttl_evictions"] += len(stale)
        return len(stale)

    def _tombstone(self, sid: str) -> None:
        if sid in self.deleted_ids:
            return
        order = self.deleted_order
        if not order.maxlen:
            return  # capacity 0: remembers nothing (for resurrection tests)
        if len(order) == order.maxlen:
            # The deque drops its oldest on append; forget it in the set too.
            self.deleted_ids.discard(order[0])
        order.append(sid)
        self.deleted_ids.add(sid)

    # --- benchmark helper ---------------------------------------------------

    def bulk_load_auto_created(self, sids: Iterable[str], factory: Callable[[], Any]) -> None:
        """Put ``sids`` in the state N auto-creates would leave, without N scans.

        Filling a million sessions through ``get_or_create`` costs N^2/2 scan
        steps; the resulting dicts are identical, so benchmarks load directly.
        """
        now = self.clock()
        n = 0
        for sid in sids:
            self.sessions[sid] = factory()
            self.last_access[sid] = now
            n += 1
        self._counts["auto_creates"] += n
