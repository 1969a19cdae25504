"""The session registry: the Python face of the Cython core (``_registry``).

Layout: the sources are in ``csrc/rollout_sessions/registry/`` at the top of
the repository: ``_registry.pyx`` (shards, locks, the Python API),
``_registry.pxd`` (its layout, for other Cython code), and the C core
(``rs_ids.h`` ids, ``rs_table.h`` one shard, ``rs_tombstone.h`` the ring,
``rs_probe.h`` linear probing) with its Cython declarations (``rs_core.pxd``,
``rs_pthread.pxd``); ``_registry.pyi`` (its types) is here.

The core is a sharded open-addressing table keyed by 128-bit ids, a ring
buffer tombstone of fixed capacity, and a per-shard LRU list for idle TTL.

API (all methods are thread-safe; ids are ``str``):

``Registry(shards=64, tombstone_capacity=1 << 20, retry_window=60.0, ttl=7200.0,
manual_clock=False, instance_tag=0, secrets=None, mint_counter=0, on_evict=None)``

- ``mint(obj) -> str``: register ``obj`` under a new 32-hex id this process
  recognises as its own.
- ``create(sid, obj) -> Outcome``: ``CREATED``, ``LIVE`` (conflict, nothing
  changed) or ``DELETED`` (refused, nothing changed).
- ``lookup(sid) -> obj | DELETED | NEVER_SEEN``: refreshes the idle clock of a
  live session. Never creates.
- ``get_or_create(sid, factory) -> obj | DELETED``: auto-creates a never-seen
  id with ``factory()`` (called without any lock held).
- ``remove(sid, expected=None) -> obj | None``: removes a live id (only if it
  maps to ``expected`` when given) and tombstones it; ``None`` otherwise.
- ``expire(budget=1024) -> int``: evict up to ``budget`` idle sessions.
- ``stats() -> dict``: live, tombstones, capacity, horizon_s,
  young_overwrites, ttl_evictions, auto_creates, deleted_refusals, minted,
  created_by_id, deletes.
- ``is_self_minted(sid) -> bool``; ``advance(seconds)`` (manual clock only).

Minted ids are ``tag (3 hex digits) || payload || check value``: the
instance tag (0-4095) routes them back to the instance that minted them.
Across a restart (the journal): ``secrets`` and ``mint_counter`` recreate a
registry that recognises the ids it minted before; ``restore(sid, obj,
idle_s)`` and ``restore_deleted(key, age_s)`` put back live sessions and
deleted foreign ids; ``key_of(sid)`` is the 16-byte key the journal files a
session under; ``on_evict(key)`` hears of every idle-TTL eviction.

``tombstone_bytes(capacity)`` is what a tombstone of that capacity allocates.

Invalid ids (empty, over 128 characters, characters outside
``[A-Za-z0-9._~:-]``) raise ``ValueError`` with a message fit for a client.
"""

from rollout_sessions.registry._registry import (
    CREATED,
    DELETED,
    LIVE,
    NEVER_SEEN,
    Registry,
    tombstone_bytes,
    validate_id,
)

__all__ = ["CREATED", "DELETED", "LIVE", "NEVER_SEEN", "Registry", "tombstone_bytes", "validate_id"]
