# The C core (rs_ids.h, rs_table.h, rs_tombstone.h): ids, one shard's table,
# the tombstone ring. Pure C, callable without the GIL.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "rs_ids.h" nogil:
    ctypedef struct rs_key:
        uint64_t hi
        uint64_t lo
    ctypedef struct rs_secrets:
        uint64_t mint_k0, mint_k1, name_k0, name_k1
        uint64_t slot_k0, slot_k1, mint_base, tag
    enum:
        RS_ID_OK
        RS_ID_EMPTY
        RS_ID_TOO_LONG
        RS_ID_BAD_CHAR
        RS_ID_DOT_SEGMENT
        RS_MAX_ID_LEN
        RS_MAX_TAG
    uint64_t rs_siphash24(const uint8_t *data, size_t n, uint64_t k0, uint64_t k1)
    uint64_t rs_siphash24_core(const uint8_t *data, size_t n, uint64_t k0, uint64_t k1,
                               uint64_t *out_hi)
    int rs_validate(const uint8_t *s, size_t n, size_t *bad_at)
    int rs_parse_hex128(const uint8_t *s, size_t n, rs_key *out)
    void rs_format_hex128(rs_key key, uint8_t *out)
    rs_key rs_key_of_name(const rs_secrets *sec, const uint8_t *s, size_t n)
    rs_key rs_minted_key(const rs_secrets *sec, uint64_t counter)
    int rs_is_self_minted(const rs_secrets *sec, rs_key key, uint64_t minted)
    uint64_t rs_slot_hash(const rs_secrets *sec, rs_key key)
    uint64_t rs_counter_next(uint64_t *c)
    uint64_t rs_counter_load(const uint64_t *c)


cdef extern from "rs_table.h" nogil:
    ctypedef struct rs_entry:
        rs_key key
        void *obj
        double last
        int32_t next
    ctypedef struct rs_table:
        rs_entry *entries
        int32_t *index
        uint32_t mask
        uint32_t cap
        uint32_t live
        int32_t lru_head
    int32_t RS_NIL
    int rs_table_init(rs_table *t, const rs_secrets *sec)
    void rs_table_free(rs_table *t)
    int64_t rs_table_probe(const rs_table *t, rs_key key, uint32_t home)
    void rs_table_touch(rs_table *t, int32_t e, double now)
    int32_t rs_table_insert(rs_table *t, rs_key key, void *obj, double now)
    void *rs_table_delete_slot(rs_table *t, uint32_t slot)
    int rs_table_expired(const rs_table *t, int32_t e, double now, double ttl)
    int64_t rs_table_expired_head(const rs_table *t, double now, double ttl)
    size_t rs_table_bytes(const rs_table *t)


cdef extern from "rs_tombstone.h" nogil:
    ctypedef struct rs_tombstone:
        uint32_t cap
        uint32_t count
        uint64_t overwritten
        uint64_t young_overwrites
    int rs_tomb_init(rs_tombstone *t, uint32_t cap, const rs_secrets *sec)
    void rs_tomb_free(rs_tombstone *t)
    int rs_tomb_contains(const rs_tombstone *t, rs_key key)
    void rs_tomb_push(rs_tombstone *t, rs_key key, double now, double retry_window)
    double rs_tomb_horizon(const rs_tombstone *t, double now)
    size_t rs_tomb_bytes(const rs_tombstone *t)
    uint64_t rs_tomb_bytes_for(uint64_t cap)
