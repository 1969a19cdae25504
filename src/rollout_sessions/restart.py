"""Start-up: the registry, with everything the journal kept put back.

In order: the registry's secrets and mint counter (ids minted before are
still ours), the deleted foreign ids into the tombstone ring (oldest first,
with their ages), then every live session, oldest access first (the idle-TTL
order), its trajectory replayed turn by turn from the journal. A session
whose id is also among the deleted ones stays deleted.
"""

from __future__ import annotations

import logging
import time

from rollout_sessions.config import Settings
from rollout_sessions.forest_restore import restore_forest
from rollout_sessions.journal import Journal, JournalError, Restored
from rollout_sessions.registry import Registry
from rollout_sessions.session import Session
from rollout_sessions.store import Trajectory

log = logging.getLogger("rollout_sessions")


def open_registry(settings: Settings) -> tuple[Registry, Journal | None]:
    """The registry (restored from ``DATA_DIR`` when the journal is on) and the journal."""
    if not settings.journal:
        log.info("journal off: sessions live in memory only, nothing is written to disk")
        return _registry(settings, None, 0, None), None
    started = time.monotonic()
    journal = Journal(settings.data_dir, settings.journal_sync, settings.journal_max_bytes)

    def progress(done: int, total: int) -> None:
        log.info("restoring: %d of %d sessions read from the journal", done, total)

    restored = journal.load(settings.tombstone_capacity, settings.instance_tag, progress)
    try:
        registry, sessions = _restore(settings, journal, restored)
    except Exception as exc:  # a row that cannot be replayed: a clear refusal, not a traceback
        raise JournalError(
            f"the journal in {settings.data_dir} cannot be replayed "
            f"({type(exc).__name__}: {exc}); nothing was deleted"
        ) from None
    journal.save_start(registry.secrets, registry.mint_counter, settings.instance_tag)
    log.info(
        "journal %s: %d sessions (%d turns) and %d deleted ids restored in %.2fs",
        settings.data_dir,
        sessions,
        sum(len(w) for w in restored.turns.values()) + sum(len(w) for w in restored.nodes.values()),
        len(restored.deleted),
        time.monotonic() - started,
    )
    return registry, journal


def _restore(settings: Settings, journal: Journal, restored: Restored) -> tuple[Registry, int]:
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
        if nodes or (writes and settings.trajectory == "tree"):  # a forest: forest_restore
            forest = restore_forest(settings, sid, writes, nodes, journal, key)
            session.traj = forest  # type: ignore[assignment]
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
