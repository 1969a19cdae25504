# The layout of the Registry type and of its shards, for any Cython code that
# wants the registry without going through Python calls. The C core it is
# built on is declared in rs_core.pxd and rs_pthread.pxd.

from libc.stdint cimport uint32_t, uint64_t

from rs_core cimport *
from rs_pthread cimport *


# One shard: its table, its lock, and the counters its operations bump.
ctypedef struct rs_shard:
    pthread_mutex_t lock
    rs_table table
    uint64_t created_by_id
    uint64_t auto_creates
    uint64_t minted
    uint64_t deletes
    uint64_t deleted_refusals
    uint64_t ttl_evictions


# An entry taken out by idle-TTL eviction, released once the shard lock is free.
ctypedef struct rs_dead:
    rs_key key
    void *obj


# A parsed id: its key, where it lives, and whether it is one of ours.
ctypedef struct rs_id:
    rs_key key
    uint64_t hash
    uint32_t shard
    bint hexid


# What inserting under a never-seen id came to.
cdef enum Admit:
    ADMITTED
    ALREADY_LIVE
    REFUSED_DELETED
    OUT_OF_MEMORY


cdef class Registry:
    cdef rs_shard *_shards
    cdef uint32_t _nshards
    cdef rs_tombstone _tomb
    cdef pthread_mutex_t _tomb_lock
    cdef rs_secrets _sec
    cdef uint64_t _mint_counter
    cdef double _ttl
    cdef double _retry_window
    cdef bint _manual_clock
    cdef double _manual_now
    cdef uint32_t _expire_cursor
    cdef bytes _secrets
    cdef object _on_evict

    cdef int _parse(self, object sid, rs_id *out, bint restored=*) except -1
    cdef double _now(self) noexcept nogil
    cdef void _release(self, rs_dead *dead, int n)
    cdef bint _is_deleted(self, const rs_id *rid) noexcept
    cdef object _insert(self, const rs_id *rid, object obj, bint by_id, Admit *outcome)
