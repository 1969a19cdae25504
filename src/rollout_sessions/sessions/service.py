"""The session service: the one owner of session state and of its durability rules.

``Sessions`` holds the registry (ids, tombstones, idle TTL), the journal (when
on) and each session's lock, and offers what the routes need: mint, create
by id, look up, auto-create, delete, record a turn, read a snapshot (with
its answers or its logprobs), and, at start-up, restore everything the
journal kept. The routes are HTTP adapters around it.

The rules, each stated and coded here only:

- **Journal first.** A create, delete or turn changes memory only after its
  journal write committed; a write that fails (507 for lack of space, 503
  otherwise) leaves the session exactly as it was, in memory and on disk.
- **Session lock.** A turn's record and a delete are serialised by the
  session's lock, which is never held across an upstream call; a reader that
  needs the journal (answers, logprobs) queues its read under the lock, so it
  sees exactly the turns of its snapshot.
- **Delete sticks.** A deleted id never comes back: the registry knows minted
  ids as ours (no tombstone needed) and remembers deleted foreign ids in its
  ring; the journal keeps those for the ring that restarts with them.
- **Restart tolerance.** A never-seen id reads empty and is created by its
  first chat turn; the journal's first write for it is that turn's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rollout_sessions.config import Settings
from rollout_sessions.journal.writer import Journal, JournalError, Restored
from rollout_sessions.registry import CREATED, DELETED, LIVE, NEVER_SEEN, Registry, validate_id
from rollout_sessions.sessions.forest_restore import restore_forest
from rollout_sessions.sessions.session import Session
from rollout_sessions.trajectory.forest import Forest, NodeWrite
from rollout_sessions.trajectory.store import Trajectory, TurnWrite
from rollout_sessions.upstream.controls import InFlight
from rollout_sessions.web import errors
from rollout_sessions.web.errors import ApiError

log = logging.getLogger("rollout_sessions")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change:
    """A prepared change of a session's trajectory: its journal write (queued,
    returning the commit's future) and how memory applies it once committed
    (``keep_answer``: no journal keeps the answers)."""

    write: Callable[[Journal, bytes], Awaitable[Any]]
    apply: Callable[[bool], None]


# What ``record`` answers: the turn was recorded, or why not.
RECORDED = "recorded"
CLOSING = "closing"  # deleted, closing or expired meanwhile: answered, not recorded
STALE = "stale"  # another turn of the session was recorded meanwhile


class Sessions:
    """Every session of one server process (see the module docstring)."""

    def __init__(
        self, registry: Registry, journal: Journal | None, inflight: InFlight | None = None
    ) -> None:
        self.registry = registry
        self.journal = journal
        self.inflight = inflight  # CANCEL_ON_DELETE: the upstream calls a delete cancels

    # -- start-up ----------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Settings, inflight: InFlight | None = None) -> Sessions:
        """The sessions of ``settings``: restored from ``DATA_DIR`` when the journal is
        on. Raises ``JournalError`` (a clear message) when they cannot be."""
        if not settings.journal:
            log.info("journal off: sessions live in memory only, nothing is written to disk")
            return cls(_registry(settings, None, 0, None), None, inflight)
        started = time.monotonic()
        journal = Journal(settings.data_dir, settings.journal_sync, settings.journal_max_bytes)

        def progress(done: int, total: int) -> None:
            log.info("restoring: %d of %d sessions read from the journal", done, total)

        restored = journal.load(settings.tombstone_capacity, settings.instance_tag, progress)
        try:
            registry, sessions = _restore(settings, journal, restored)
        except Exception as exc:  # a row that cannot be replayed: a refusal, not a traceback
            raise JournalError(
                f"the journal in {settings.data_dir} cannot be replayed "
                f"({type(exc).__name__}: {exc}); nothing was deleted"
            ) from None
        journal.save_start(registry.secrets, registry.mint_counter, settings.instance_tag)
        log.info(
            "journal %s: %d sessions (%d turns) and %d deleted ids restored in %.2fs",
            settings.data_dir,
            sessions,
            sum(len(w) for w in restored.turns.values())
            + sum(len(w) for w in restored.nodes.values()),
            len(restored.deleted),
            time.monotonic() - started,
        )
        return cls(registry, journal, inflight)

    # -- lifecycle -----------------------------------------------------------------------

    async def mint(self) -> str:
        """A new id of ours, live (and journaled) when returned."""
        registry, journal = self.registry, self.journal
        if journal is None:
            return registry.mint(Session())
        # An id is handed out only below the reservation on disk.
        while (reserving := journal.reserve_mints(registry.mint_counter)) is not None:
            try:
                await reserving
            except ApiError as exc:
                raise errors.minting_unavailable(exc.message) from None
        sid = registry.mint(Session())
        try:
            await journal.create(registry.key_of(sid), sid, "minted")
        except ApiError:
            registry.remove(sid)  # never handed out; ours, so no tombstone either
            raise
        return sid

    async def create(self, sid: str) -> None:
        """A session under ``sid``: 409 if live, 404 if deleted, 400 if invalid."""
        registry, journal = self.registry, self.journal
        if journal is not None:
            current = id_checked(registry.lookup, sid)
            if current is DELETED:
                raise errors.session_not_found(sid)
            if current is not NEVER_SEEN:
                raise errors.session_exists(sid)
            await journal.create(registry.key_of(sid), sid, "by_id")
        outcome = id_checked(registry.create, sid, Session())
        if outcome is LIVE:
            raise errors.session_exists(sid)
        if outcome is not CREATED:  # deleted meanwhile: it stays deleted on disk too
            if journal is not None:
                journal.expire(registry.key_of(sid))
            raise errors.session_not_found(sid)

    def lookup(self, sid: str) -> Any:
        """The live ``Session``, ``NEVER_SEEN`` or ``DELETED`` (400 for an invalid id)."""
        return id_checked(self.registry.lookup, sid)

    def check_id(self, sid: str) -> None:
        id_checked(validate_id, sid)

    def live_for_turn(self, sid: str) -> Any:
        """For a chat turn: the live session or ``NEVER_SEEN``; 404 if deleted or closing."""
        session = self.lookup(sid)
        if session is DELETED or (session is not NEVER_SEEN and session.closing):
            raise errors.session_not_found(sid)
        return session

    def auto_create(self, sid: str) -> Session:
        """Restart tolerance: a never-seen id's first turn creates it (in memory; its
        journal row comes with the turn's record)."""
        session = self.registry.get_or_create(sid, Session)
        if session is DELETED or session.closing:  # deleted meanwhile
            raise errors.session_not_found(sid)
        return session

    async def delete(self, sid: str) -> int:
        """Delete ``sid`` for good; 404 if unknown, deleted or closing. Returns how
        many of its upstream calls were cancelled (``CANCEL_ON_DELETE``).

        Marked closing first (a turn arriving meanwhile is 404), then removed
        under its lock, which waits for a turn's locked steps, never for its
        upstream call; once gone for good, its turns waiting for the backend
        are cancelled (their connections closed: the backend aborts them).
        """
        session = self.lookup(sid)
        if session is NEVER_SEEN or session is DELETED or session.closing:
            raise errors.session_not_found(sid)
        session.closing = True
        try:
            # A session that never chatted has no lock: deleting it does not make one.
            lock = session.lock_if_any
            if lock is None:
                await self._forget(sid, session)
            else:
                async with lock:
                    await self._forget(sid, session)
        except ApiError:
            session.closing = False  # nothing changed
            raise
        return self.inflight.cancel(session) if self.inflight is not None else 0

    async def _forget(self, sid: str, session: Session) -> None:
        registry, journal = self.registry, self.journal
        if journal is not None:
            # A minted id needs no tombstone (the registry knows it as ours).
            await journal.delete(registry.key_of(sid), not registry.is_self_minted(sid))
        registry.remove(sid, expected=session)

    # -- turns ---------------------------------------------------------------------------

    async def record(
        self,
        sid: str,
        session: Session,
        version: int | None,
        prepare: Callable[[Any], Change | str],
    ) -> str:
        """Record a turn: ``RECORDED``, or why not (``CLOSING``, ``STALE``, or what
        ``prepare`` answered instead of a change).

        Under the session lock: a session deleted, closing or expired during the
        upstream call records nothing, nor does a plan made on another
        ``version`` of the store (None: tree mode, where concurrent turns are
        siblings); ``prepare(trajectory)`` (no awaits) builds the change
        (``linear_change``, ``forest_change``); the journal commits it before
        memory applies it.
        """
        async with session.lock:
            if session.closing or self.registry.lookup(sid) is not session:
                # (The lookup also counts the turn's end as activity.)
                return CLOSING
            traj = session.traj if session.traj is not None else session.trajectory
            if version is not None and traj.version != version:
                return STALE
            change = prepare(traj)
            if type(change) is str:
                return change
            journal = self.journal
            if journal is not None:
                await change.write(journal, self.registry.key_of(sid))
            change.apply(journal is None)
        return RECORDED

    @staticmethod
    def linear_change(sid: str, traj: Trajectory, write: TurnWrite) -> Change:
        """A linear turn, as ``record`` commits it."""
        has_row = traj.version > 0  # a committed turn means the session's row is written
        return Change(
            lambda journal, key: journal.turn(key, sid, "auto", write, has_row),
            lambda keep_answer: traj.apply(write, keep_answer=keep_answer),
        )

    @staticmethod
    def forest_change(sid: str, forest: Forest, writes: list[NodeWrite], matcher: str) -> Change:
        """The nodes of a tree-mode turn (one a choice), as ``record`` commits them."""
        has_row, n_nodes = forest.n_nodes > 0, forest.n_nodes

        def apply(keep_answer: bool) -> None:
            for write in writes:
                forest.apply(write, keep_answer=keep_answer)

        return Change(
            lambda journal, key: journal.nodes(key, sid, "auto", writes, matcher, has_row, n_nodes),
            apply,
        )

    async def snapshot(
        self,
        sid: str,
        session: Session,
        take: Callable[[Any], T],
        reads: Callable[[Journal, bytes, T], list[Any]] | None = None,
    ) -> tuple[T, list[Any] | None]:
        """``take(trajectory)`` under the session lock, and, with the journal on,
        the journal reads ``reads(journal, key, snapshot)`` queues (futures, or
        None), their results once committed: the reads are queued while the lock
        is held, so they see exactly the turns of the snapshot (a turn holds the
        lock until its write is committed)."""
        journal = self.journal
        async with session.lock:
            snap = take(session.traj)
            pending = None
            if journal is not None and reads is not None:
                pending = reads(journal, self.registry.key_of(sid), snap)
        if pending is None:
            return snap, None
        return snap, [await p if p is not None else None for p in pending]

    async def read(
        self, sid: str, session: Session
    ) -> tuple[Trajectory | None, list[bytes] | None]:
        """A snapshot of the trajectory, and its answers when the journal keeps them."""
        if session.traj is None:
            return None, None
        if self.journal is None:
            return session.traj.snapshot(), None
        snap, read = await self.snapshot(
            sid, session, _take, lambda journal, key, _: [journal.answers(key)]
        )
        return snap, read[0] if read is not None else None


def _take(traj: Trajectory | None) -> Trajectory | None:
    return traj.snapshot() if traj is not None else None


def id_checked(op: Callable[..., T], session_id: str, *args: Any) -> T:
    """``op(session_id, *args)`` for a registry operation; the registry's
    ValueError for an invalid id becomes the 400 answer."""
    try:
        return op(session_id, *args)
    except ValueError as exc:
        raise errors.invalid_session_id(str(exc)) from None


def _restore(settings: Settings, journal: Journal, restored: Restored) -> tuple[Registry, int]:
    """The registry with what the journal kept put back, in order: secrets and mint
    counter (ids minted before are still ours), the deleted foreign ids into the
    tombstone ring (oldest first, with their ages), then every live session,
    oldest access first (the idle-TTL order), its trajectory replayed."""
    registry = _registry(settings, restored.secrets, restored.mint_counter, journal)
    now = time.time()
    deleted = set()
    for key, at in restored.deleted:
        registry.restore_deleted(key, max(0.0, now - at))
        deleted.add(key)
    sessions = 0
    for key, sid, _kind, touched in restored.sessions:
        if key in deleted:
            continue
        session = Session()
        writes = restored.turns.get(key)
        nodes = restored.nodes.get(key)
        if nodes or (writes and settings.trajectory == "tree"):  # a forest
            session.traj = restore_forest(settings, sid, writes, nodes, journal, key)  # type: ignore[assignment]
        elif writes:
            traj = session.traj = Trajectory()
            for write in writes:
                traj.apply(write, keep_answer=False)
        if registry.restore(sid, session, max(0.0, now - touched)):
            sessions += 1
        if sessions % 50_000 == 0 and sessions:
            log.info("restoring: %d sessions live", sessions)
    return registry, sessions


def _registry(
    settings: Settings, secrets: bytes | None, mint_counter: int, journal: Journal | None
) -> Registry:
    return Registry(
        shards=settings.shards,
        tombstone_capacity=settings.tombstone_capacity,
        retry_window=settings.retry_window_s,
        ttl=settings.session_ttl_s,
        instance_tag=settings.instance_tag,
        secrets=secrets,
        mint_counter=mint_counter,
        on_evict=journal.expire if journal is not None else None,
    )
