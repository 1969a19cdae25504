# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sharded session registry: the Cython face of the C core in rs_*.h.

Locking protocol (why it cannot deadlock): nobody *waits* for a lock while
holding the GIL (``_lock``: a free lock is taken at once, GIL held; a held
one is waited for with the GIL released, which is then taken back before
the table is touched). Locks are taken in one order, shard lock then
tombstone lock, and nobody runs Python code (decref can) while holding one.
"""

import os

from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.time cimport clock_gettime, timespec


cdef extern from "<time.h>" nogil:
    int CLOCK_MONOTONIC_COARSE


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)


# At most this many idle sessions are evicted per ordinary operation (on the
# shard it touches) and per lock hold in expire(): bounded work per call.
cdef enum:
    EVICT_PER_OP = 2
    EVICT_CHUNK = 64

ALLOWED_ID_CHARS = "[A-Za-z0-9._~:-]"


class Outcome:
    """A named result of a registry operation, compared with ``is``."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name

    def __reduce__(self):
        return self.name


CREATED = Outcome("CREATED")
LIVE = Outcome("LIVE")
DELETED = Outcome("DELETED")
NEVER_SEEN = Outcome("NEVER_SEEN")


cdef str _invalid_reason(int code, object sid, size_t bad_at):
    if code == RS_ID_EMPTY:
        return "invalid session id: empty"
    if code == RS_ID_TOO_LONG:
        return f"invalid session id: {len(sid)} characters, at most {RS_MAX_ID_LEN} allowed"
    if code == RS_ID_DOT_SEGMENT:
        return f"invalid session id: {sid!r} is a dot segment, which HTTP clients remove from paths"
    return (
        f"invalid session id: character {sid[bad_at]!r} at position {bad_at}"
        f" is not in {ALLOWED_ID_CHARS}"
    )


cdef int _check_id(object sid, bint restored=False) except -1:
    """Raises ValueError unless ``sid`` is a valid id; the one place ids are judged.

    ``restored``: an id read back from the journal, which may predate the rule
    against dot segments; such a session comes back (unreachable over HTTP,
    it expires by the idle TTL) instead of failing the start-up."""
    cdef size_t bad_at = 0
    cdef int code
    cdef Py_ssize_t i
    if not isinstance(sid, str):
        raise ValueError(f"invalid session id: expected a string, got {type(sid).__name__}")
    if not PyUnicode_IS_ASCII(sid):
        if len(sid) > RS_MAX_ID_LEN:
            raise ValueError(_invalid_reason(RS_ID_TOO_LONG, sid, 0))
        for i in range(len(sid)):
            if ord(sid[i]) > 127:
                raise ValueError(_invalid_reason(RS_ID_BAD_CHAR, sid, i))
    code = rs_validate(<const uint8_t *>PyUnicode_DATA(sid), PyUnicode_GET_LENGTH(sid), &bad_at)
    if code != RS_ID_OK and not (restored and code == RS_ID_DOT_SEGMENT):
        raise ValueError(_invalid_reason(code, sid, bad_at))
    return 0


def validate_id(sid):
    """Raises ValueError with a client-fit message unless ``sid`` is a valid id."""
    _check_id(sid)


def siphash24(bytes data, bytes key, bint wide=False):
    """SipHash-2-4 of ``data`` under a 16-byte ``key`` (exposed for tests): a
    64-bit int, or with ``wide`` the 16 bytes of the 128-bit-output variant."""
    if len(key) != 16:
        raise ValueError("key must be 16 bytes")
    cdef uint64_t k0 = int.from_bytes(key[:8], "little")
    cdef uint64_t k1 = int.from_bytes(key[8:], "little")
    cdef uint64_t hi = 0
    cdef uint64_t lo = rs_siphash24_core(<const uint8_t *>(<char *>data), len(data), k0, k1,
                                         &hi if wide else NULL)
    if wide:
        return lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
    return lo


SECRETS_BYTES = 56  # seven 64-bit words: mint check key, name key, slot key, mint base


cdef bytes _key_bytes(rs_key key):
    return key.hi.to_bytes(8, "big") + key.lo.to_bytes(8, "big")


cdef rs_key _key_from_bytes(bytes raw) except *:
    cdef rs_key key
    if len(raw) != 16:
        raise ValueError("a key is 16 bytes")
    key.hi = int.from_bytes(raw[:8], "big")
    key.lo = int.from_bytes(raw[8:], "big")
    return key


def tombstone_bytes(unsigned long long capacity):
    """Bytes a tombstone of ``capacity`` entries allocates (ring plus set)."""
    return rs_tomb_bytes_for(capacity)


cdef inline void _lock(pthread_mutex_t *m) noexcept:
    """Takes ``m``; the GIL is let go only to wait for a lock another thread holds.

    A table operation takes well under a microsecond, less than giving the
    GIL away and taking it back. And with a second Python thread running (the
    journal's writer), a release hands the GIL over: the event loop would
    then wait for that thread at every lookup. With a GIL, then, operations
    run one at a time and a lock is always free when taken; the locks keep
    each operation atomic on an interpreter without one.
    """
    if pthread_mutex_trylock(m) != 0:
        with nogil:
            pthread_mutex_lock(m)


cdef inline void _evict_slot(rs_shard *sh, uint32_t slot, rs_dead *dead) noexcept nogil:
    """Removes an idle entry, keeping its key and object for ``_release``. Shard lock held."""
    dead.key = sh.table.entries[sh.table.index[slot]].key
    dead.obj = rs_table_delete_slot(&sh.table, slot)


cdef inline int _evict_expired(rs_shard *sh, double now, double ttl, rs_dead *dead, int budget) noexcept nogil:
    """Pops up to ``budget`` idle sessions off the shard's LRU head. Shard lock held."""
    cdef int n = 0
    cdef int64_t slot
    while n < budget:
        slot = rs_table_expired_head(&sh.table, now, ttl)
        if slot < 0:
            break
        _evict_slot(sh, <uint32_t>slot, &dead[n])
        n += 1
    sh.ttl_evictions += n
    return n


cdef inline int64_t _find_live(Registry reg, rs_shard *sh, const rs_id *rid, double *now,
                               rs_dead *dead, int *ndead) noexcept nogil:
    """Index slot of a live entry, or -1. Shard lock held.

    An entry found idle past the TTL is evicted on the spot, so expiry never
    depends on when eviction runs. The clock is read only for a found entry
    (``*now < 0`` means not read yet), which keeps misses cheap.
    """
    cdef int64_t slot = rs_table_probe(&sh.table, rid.key, <uint32_t>rid.hash & sh.table.mask)
    if slot < 0:
        return -1
    if now[0] < 0:
        now[0] = reg._now()
    if rs_table_expired(&sh.table, sh.table.index[slot], now[0], reg._ttl):
        _evict_slot(sh, <uint32_t>slot, &dead[ndead[0]])
        ndead[0] += 1
        sh.ttl_evictions += 1
        return -1
    return slot


cdef Admit _admit(Registry reg, rs_shard *sh, const rs_id *rid, void *obj, rs_dead *dead,
                  int *ndead, void **found) noexcept:
    """Inserts ``obj`` under a never-seen id; shared by create and auto-create.

    Shard lock held. ALREADY_LIVE sets ``*found`` (and refreshes it);
    nothing changes unless the outcome is ADMITTED.
    """
    cdef double now = reg._now()
    cdef int64_t slot = _find_live(reg, sh, rid, &now, dead, ndead)
    cdef int32_t e
    cdef Admit outcome
    if slot >= 0:
        e = sh.table.index[slot]
        rs_table_touch(&sh.table, e, now)
        found[0] = sh.table.entries[e].obj
        outcome = ALREADY_LIVE
    elif reg._is_deleted(rid):
        sh.deleted_refusals += 1
        outcome = REFUSED_DELETED
    elif rs_table_insert(&sh.table, rid.key, obj, now) == RS_NIL:
        outcome = OUT_OF_MEMORY
    else:
        outcome = ADMITTED
    ndead[0] += _evict_expired(sh, now, reg._ttl, dead + ndead[0], EVICT_PER_OP)
    return outcome


cdef class Registry:
    """Thread-safe map of session id -> session object with sticky deletes.

    See ``rollout_sessions.registry`` for the API.
    """

    def __cinit__(self, int shards=64, long long tombstone_capacity=1 << 20,
                  double retry_window=60.0, double ttl=7200.0, bint manual_clock=False,
                  int instance_tag=0, bytes secrets=None, unsigned long long mint_counter=0,
                  on_evict=None):
        cdef uint32_t i
        if shards < 1 or shards > 65536:
            raise ValueError("shards must be between 1 and 65536")
        if tombstone_capacity < 1 or tombstone_capacity > 0x7FFFFFFF:
            raise ValueError("tombstone_capacity must be between 1 and 2**31 - 1")
        if not retry_window >= 0:
            raise ValueError("retry_window must be >= 0")
        if not ttl > 0:
            raise ValueError("ttl must be > 0")
        if instance_tag < 0 or instance_tag > RS_MAX_TAG:
            raise ValueError(f"instance_tag must be between 0 and {RS_MAX_TAG}")
        if secrets is None:
            secrets = os.urandom(SECRETS_BYTES)
        if len(secrets) != SECRETS_BYTES:
            raise ValueError(f"secrets must be {SECRETS_BYTES} bytes")
        words = [int.from_bytes(secrets[i:i + 8], "little") for i in range(0, SECRETS_BYTES, 8)]
        self._secrets = secrets
        self._sec.mint_k0, self._sec.mint_k1 = words[0], words[1]
        self._sec.name_k0, self._sec.name_k1 = words[2], words[3]
        self._sec.slot_k0, self._sec.slot_k1 = words[4], words[5]
        self._sec.mint_base = words[6]
        self._sec.tag = instance_tag
        self._mint_counter = mint_counter
        self._on_evict = on_evict
        self._ttl = ttl
        self._retry_window = retry_window
        self._manual_clock = manual_clock
        self._manual_now = 0.0
        self._expire_cursor = 0
        self._nshards = shards
        self._shards = <rs_shard *>calloc(shards, sizeof(rs_shard))
        if self._shards == NULL:
            raise MemoryError()
        for i in range(self._nshards):
            pthread_mutex_init(&self._shards[i].lock, NULL)
            if rs_table_init(&self._shards[i].table, &self._sec) < 0:
                raise MemoryError()
        if rs_tomb_init(&self._tomb, <uint32_t>tombstone_capacity, &self._sec) < 0:
            raise MemoryError()
        pthread_mutex_init(&self._tomb_lock, NULL)

    def __dealloc__(self):
        cdef uint32_t i
        cdef int32_t e
        cdef rs_table *t
        if self._shards == NULL:
            return
        for i in range(self._nshards):
            t = &self._shards[i].table
            if t.entries != NULL:
                # Live entries are exactly those on the LRU list; each holds a reference.
                e = t.lru_head
                while e != RS_NIL:
                    Py_DECREF(<object>t.entries[e].obj)
                    e = t.entries[e].next
            rs_table_free(t)
            pthread_mutex_destroy(&self._shards[i].lock)
        free(self._shards)
        self._shards = NULL
        rs_tomb_free(&self._tomb)
        pthread_mutex_destroy(&self._tomb_lock)

    # -- internals -------------------------------------------------------

    cdef int _parse(self, object sid, rs_id *out, bint restored=False) except -1:
        _check_id(sid, restored)
        cdef const uint8_t *data = <const uint8_t *>PyUnicode_DATA(sid)
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(sid)
        out.hexid = rs_parse_hex128(data, n, &out.key)
        if not out.hexid:
            out.key = rs_key_of_name(&self._sec, data, n)
        out.hash = rs_slot_hash(&self._sec, out.key)
        out.shard = <uint32_t>((out.hash >> 32) % self._nshards)
        return 0

    cdef double _now(self) noexcept nogil:
        cdef timespec ts
        if self._manual_clock:
            return self._manual_now
        # The coarse clock (a few ms of resolution) costs a fraction of the
        # precise one; idle TTLs and retry windows are seconds.
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
        return ts.tv_sec + ts.tv_nsec * 1e-9

    cdef void _release(self, rs_dead *dead, int n):
        """Drops the table's references to evicted objects, first telling
        ``on_evict`` their keys. GIL held, no lock held."""
        cdef int i
        cdef object on_evict = self._on_evict
        for i in range(n):
            if on_evict is not None:
                try:
                    on_evict(_key_bytes(dead[i].key))
                except Exception:  # the eviction is done; a failing observer cannot undo it
                    pass
            Py_DECREF(<object>dead[i].obj)

    cdef bint _is_deleted(self, const rs_id *rid) noexcept:
        """For an id that is not live. Caller holds the id's shard lock."""
        cdef bint found
        if rid.hexid and rs_is_self_minted(&self._sec, rid.key, rs_counter_load(&self._mint_counter)):
            return True  # ours and not live: deleted or expired, no ring needed
        _lock(&self._tomb_lock)
        found = rs_tomb_contains(&self._tomb, rid.key)
        pthread_mutex_unlock(&self._tomb_lock)
        return found

    cdef object _insert(self, const rs_id *rid, object obj, bint by_id, Admit *outcome):
        """Inserts ``obj`` under a never-seen id (create and auto-create).

        Sets ``*outcome``; returns ``obj`` if admitted, the live object if the
        id is live, None if it was deleted. Raises MemoryError if the shard
        could not grow. Nothing changes unless ``obj`` is admitted.
        """
        cdef rs_shard *sh = &self._shards[rid.shard]
        cdef rs_dead dead[EVICT_PER_OP + 1]
        cdef int ndead = 0
        cdef void *found = NULL
        Py_INCREF(obj)  # the table's reference, if admitted
        _lock(&sh.lock)
        outcome[0] = _admit(self, sh, rid, <PyObject *>obj, dead, &ndead, &found)
        if outcome[0] == ADMITTED:
            if by_id:
                sh.created_by_id += 1
            else:
                sh.auto_creates += 1
        # Shard lock still held: a raced-in object cannot be freed under us.
        result = <object>found if outcome[0] == ALREADY_LIVE else None
        pthread_mutex_unlock(&sh.lock)
        self._release(dead, ndead)
        if outcome[0] == ADMITTED:
            return obj
        Py_DECREF(obj)
        if outcome[0] == OUT_OF_MEMORY:
            raise MemoryError("session table could not grow")
        return result

    # -- operations ------------------------------------------------------

    def mint(self, obj):
        """Registers ``obj`` under a new self-recognising 32-hex id; returns the id."""
        cdef uint64_t counter = rs_counter_next(&self._mint_counter)
        cdef rs_key key = rs_minted_key(&self._sec, counter)
        cdef uint64_t h = rs_slot_hash(&self._sec, key)
        cdef rs_shard *sh = &self._shards[(h >> 32) % self._nshards]
        cdef int32_t e
        cdef rs_dead dead[EVICT_PER_OP]
        cdef int ndead
        cdef double now
        sid = PyUnicode_New(32, 127)
        rs_format_hex128(key, <uint8_t *>PyUnicode_DATA(sid))
        Py_INCREF(obj)
        _lock(&sh.lock)
        now = self._now()
        ndead = _evict_expired(sh, now, self._ttl, dead, EVICT_PER_OP)
        e = rs_table_insert(&sh.table, key, <PyObject *>obj, now)
        if e != RS_NIL:
            sh.minted += 1
        pthread_mutex_unlock(&sh.lock)
        self._release(dead, ndead)
        if e == RS_NIL:
            Py_DECREF(obj)
            raise MemoryError("session table could not grow")
        return sid

    def create(self, sid, obj):
        """Registers ``obj`` under ``sid``: CREATED, or LIVE / DELETED and nothing changed."""
        cdef rs_id rid
        cdef Admit outcome
        self._parse(sid, &rid)
        self._insert(&rid, obj, True, &outcome)
        if outcome == ADMITTED:
            return CREATED
        return LIVE if outcome == ALREADY_LIVE else DELETED

    def lookup(self, sid):
        """The live object (its idle clock refreshed), or DELETED, or NEVER_SEEN."""
        cdef rs_id rid
        cdef rs_shard *sh
        cdef rs_dead dead[1]
        cdef int ndead = 0
        cdef int64_t slot
        cdef int32_t e
        cdef PyObject *found = NULL
        cdef bint deleted = False
        cdef double now = -1.0
        self._parse(sid, &rid)
        sh = &self._shards[rid.shard]
        _lock(&sh.lock)
        # A read does no piggyback eviction (writes and expire() do).
        slot = _find_live(self, sh, &rid, &now, dead, &ndead)
        if slot >= 0:
            e = sh.table.index[slot]
            rs_table_touch(&sh.table, e, now)
            found = <PyObject *>sh.table.entries[e].obj
        else:
            deleted = self._is_deleted(&rid)
            if deleted:
                sh.deleted_refusals += 1
        # Shard lock still held: the object cannot be freed under us.
        if found != NULL:
            result = <object>found
        else:
            result = DELETED if deleted else NEVER_SEEN
        pthread_mutex_unlock(&sh.lock)
        self._release(dead, ndead)
        return result

    def get_or_create(self, sid, factory):
        """The live object, or a new ``factory()`` for a never-seen id, or DELETED."""
        cdef rs_id rid
        cdef Admit outcome
        result = self.lookup(sid)
        if result is not NEVER_SEEN:
            return result
        obj = factory()  # no lock held: the factory may do anything
        self._parse(sid, &rid)
        result = self._insert(&rid, obj, False, &outcome)
        return DELETED if outcome == REFUSED_DELETED else result

    def remove(self, sid, expected=None):
        """Removes a live id and tombstones it; returns its object, or None if not live
        (or, with ``expected``, if the id maps to another object).

        With ``expected`` the caller held the session, so the id did exist: if
        idle-TTL eviction took it meanwhile, the id is still tombstoned (delete
        sticks even when eviction wins the race) and None is returned."""
        cdef rs_id rid
        cdef rs_shard *sh
        cdef rs_dead dead[EVICT_PER_OP + 1]
        cdef int ndead = 0
        cdef int64_t slot
        cdef void *removed = NULL
        cdef PyObject *want = NULL if expected is None else <PyObject *>expected
        cdef double now
        cdef bint foreign
        self._parse(sid, &rid)
        sh = &self._shards[rid.shard]
        _lock(&sh.lock)
        now = self._now()
        slot = _find_live(self, sh, &rid, &now, dead, &ndead)
        # Our own ids are recognised without the ring; only foreign ones need it.
        foreign = not (rid.hexid and rs_is_self_minted(&self._sec, rid.key,
                                                       rs_counter_load(&self._mint_counter)))
        if slot >= 0 and (want == NULL or sh.table.entries[sh.table.index[slot]].obj == want):
            removed = rs_table_delete_slot(&sh.table, <uint32_t>slot)
            sh.deletes += 1
            if foreign:
                _lock(&self._tomb_lock)
                rs_tomb_push(&self._tomb, rid.key, now, self._retry_window)
                pthread_mutex_unlock(&self._tomb_lock)
        elif slot < 0 and want != NULL and foreign:
            _lock(&self._tomb_lock)
            if not rs_tomb_contains(&self._tomb, rid.key):
                rs_tomb_push(&self._tomb, rid.key, now, self._retry_window)
            pthread_mutex_unlock(&self._tomb_lock)
        ndead += _evict_expired(sh, now, self._ttl, dead + ndead, EVICT_PER_OP)
        pthread_mutex_unlock(&sh.lock)
        self._release(dead, ndead)
        if removed == NULL:
            return None
        result = <object>removed
        Py_DECREF(result)  # hand the table's reference over to the caller
        return result

    def expire(self, Py_ssize_t budget=1024):
        """Evicts up to ``budget`` sessions idle longer than the TTL; returns how many.
        Work is bounded by ``budget`` plus one visit per shard."""
        cdef Py_ssize_t total = 0
        cdef uint32_t visited = 0
        cdef rs_shard *sh
        cdef rs_dead dead[EVICT_CHUNK]
        cdef int n, want
        while total < budget and visited < self._nshards:
            sh = &self._shards[self._expire_cursor]
            want = <int>min(<Py_ssize_t>EVICT_CHUNK, budget - total)
            _lock(&sh.lock)
            n = _evict_expired(sh, self._now(), self._ttl, dead, want)
            pthread_mutex_unlock(&sh.lock)
            self._release(dead, n)
            total += n
            if n < want:  # this shard is clean for now: move on
                self._expire_cursor = (self._expire_cursor + 1) % self._nshards
                visited += 1
        return total

    # -- restart (the journal) ---------------------------------------------

    def key_of(self, sid):
        """The 16-byte key ``sid`` is stored under (stable while the secrets are)."""
        cdef rs_id rid
        self._parse(sid, &rid)
        return _key_bytes(rid.key)

    def restore(self, sid, obj, double idle_s=0.0):
        """Registers ``obj`` under ``sid`` as idle for ``idle_s`` seconds (after a
        restart). Restore in order of last access, oldest first: the idle-TTL
        order is the insertion order. False if ``sid`` is live already."""
        cdef rs_id rid
        cdef rs_shard *sh
        cdef int64_t slot
        cdef int32_t e = RS_NIL
        self._parse(sid, &rid, True)
        sh = &self._shards[rid.shard]
        Py_INCREF(obj)
        _lock(&sh.lock)
        slot = rs_table_probe(&sh.table, rid.key, <uint32_t>rid.hash & sh.table.mask)
        if slot < 0:
            e = rs_table_insert(&sh.table, rid.key, <PyObject *>obj, self._now() - idle_s)
        pthread_mutex_unlock(&sh.lock)
        if slot >= 0 or e == RS_NIL:
            Py_DECREF(obj)
            if slot < 0:
                raise MemoryError("session table could not grow")
            return False
        return True

    def restore_deleted(self, bytes key, double age_s=0.0):
        """Remembers a deleted foreign id's key as deleted ``age_s`` seconds ago
        (after a restart; oldest first, like the ring itself)."""
        cdef rs_key k = _key_from_bytes(key)
        cdef double when = self._now() - age_s
        _lock(&self._tomb_lock)
        if not rs_tomb_contains(&self._tomb, k):
            rs_tomb_push(&self._tomb, k, when, self._retry_window)
        pthread_mutex_unlock(&self._tomb_lock)

    @property
    def secrets(self):
        """What makes this registry's keys and mints: keep it to recognise them later."""
        return self._secrets

    @property
    def mint_counter(self):
        """How many ids were minted with these secrets (the next payload)."""
        return rs_counter_load(&self._mint_counter)

    @property
    def instance_tag(self):
        return self._sec.tag

    # -- introspection ---------------------------------------------------

    def is_self_minted(self, sid):
        """True if ``sid`` is an id this registry minted (live or not)."""
        cdef rs_id rid
        self._parse(sid, &rid)
        return bool(rid.hexid and rs_is_self_minted(&self._sec, rid.key,
                                                    rs_counter_load(&self._mint_counter)))

    def __len__(self):
        cdef uint64_t live = 0
        cdef uint32_t i
        for i in range(self._nshards):
            _lock(&self._shards[i].lock)
            live += self._shards[i].table.live
            pthread_mutex_unlock(&self._shards[i].lock)
        return live

    def stats(self):
        """Counters and gauges, summed over shards."""
        cdef uint64_t live = 0, by_id = 0, auto = 0, minted = 0, deletes = 0
        cdef uint64_t refusals = 0, evictions = 0
        cdef size_t table_bytes = 0
        cdef uint32_t i
        cdef rs_shard *sh
        cdef double horizon
        cdef uint64_t held, overwritten, young
        for i in range(self._nshards):
            sh = &self._shards[i]
            _lock(&sh.lock)
            live += sh.table.live
            by_id += sh.created_by_id
            auto += sh.auto_creates
            minted += sh.minted
            deletes += sh.deletes
            refusals += sh.deleted_refusals
            evictions += sh.ttl_evictions
            table_bytes += rs_table_bytes(&sh.table)
            pthread_mutex_unlock(&sh.lock)
        _lock(&self._tomb_lock)
        held = self._tomb.count
        overwritten = self._tomb.overwritten
        young = self._tomb.young_overwrites
        horizon = rs_tomb_horizon(&self._tomb, self._now())
        pthread_mutex_unlock(&self._tomb_lock)
        return {
            "live": live,
            "tombstones": held,
            "capacity": self._tomb.cap,
            "horizon_s": horizon,
            "overwritten": overwritten,
            "young_overwrites": young,
            "ttl_evictions": evictions,
            "auto_creates": auto,
            "deleted_refusals": refusals,
            "minted": minted,
            "created_by_id": by_id,
            "deletes": deletes,
            "table_bytes": table_bytes,
            "tombstone_bytes": rs_tomb_bytes(&self._tomb),
        }

    @property
    def shards(self):
        return self._nshards

    @property
    def tombstone_capacity(self):
        return self._tomb.cap

    @property
    def ttl(self):
        return self._ttl

    @property
    def retry_window(self):
        return self._retry_window

    # -- clock (tests and simulations) -----------------------------------

    def now(self):
        """The registry clock, in seconds."""
        return self._now()

    def advance(self, double seconds):
        """Moves a manual clock forward."""
        if not self._manual_clock:
            raise RuntimeError("advance() needs Registry(manual_clock=True)")
        if not seconds >= 0:
            raise ValueError("the clock only moves forward")
        self._manual_now += seconds
