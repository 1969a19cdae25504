/* The tombstone: the most recent `cap` deleted foreign ids.
 *
 * A preallocated ring of (key, delete time) plus an open-addressing set of
 * ring positions for O(1) membership. When full, a push overwrites the
 * oldest entry and drops it from the set. Entries overwritten while younger
 * than the retry window are counted: that is the operator's signal that the
 * capacity is too small for the delete rate.
 *
 * Cost: 24 bytes per ring entry plus one int32 set slot per entry at load
 * <= 1/2 (8 bytes), 32 bytes per remembered delete. The set starts zeroed
 * (calloc), so untouched pages cost no resident memory.
 *
 * The caller holds the tombstone lock; no Python state is touched.
 */
#ifndef RS_TOMBSTONE_H
#define RS_TOMBSTONE_H

#include <stdint.h>
#include <stdlib.h>

#include "rs_ids.h"
#include "rs_probe.h"

typedef struct {
    rs_key key;
    double when;
} rs_grave;

typedef struct {
    rs_grave *ring;
    uint32_t *set;        /* ring position + 1 per slot; 0 is empty */
    uint32_t set_mask;
    uint32_t cap;
    uint32_t oldest;      /* ring position of the oldest entry */
    uint32_t count;
    uint64_t overwritten;
    uint64_t young_overwrites;
    const rs_secrets *sec;
} rs_tombstone;

/* Set slots for `cap` entries: a power of two keeping the load <= 1/2. */
static inline uint64_t rs_tomb_set_slots(uint64_t cap) {
    uint64_t slots = 2;
    while (slots < 2 * cap) slots <<= 1;
    return slots;
}

/* Bytes a tombstone of `cap` entries allocates: the one formula for sizing. */
static inline uint64_t rs_tomb_bytes_for(uint64_t cap) {
    return sizeof(rs_grave) * cap + sizeof(uint32_t) * rs_tomb_set_slots(cap);
}

static inline int rs_tomb_init(rs_tombstone *t, uint32_t cap, const rs_secrets *sec) {
    uint64_t slots = rs_tomb_set_slots(cap);
    t->ring = (rs_grave *)malloc(sizeof(rs_grave) * (size_t)cap);
    t->set = (uint32_t *)calloc((size_t)slots, sizeof(uint32_t));
    if (!t->ring || !t->set) {
        free(t->ring);
        free(t->set);
        t->ring = NULL;
        t->set = NULL;
        return -1;
    }
    t->set_mask = (uint32_t)(slots - 1);
    t->cap = cap;
    t->oldest = t->count = 0;
    t->overwritten = t->young_overwrites = 0;
    t->sec = sec;
    return 0;
}

static inline void rs_tomb_free(rs_tombstone *t) {
    free(t->ring);
    free(t->set);
    t->ring = NULL;
    t->set = NULL;
}

static inline uint32_t rs_tomb_home(const rs_tombstone *t, rs_key key) {
    /* The table uses the low bits of the same hash; take the high half here. */
    return (uint32_t)(rs_slot_hash(t->sec, key) >> 32) & t->set_mask;
}

/* Set slot holding `key`, or -1. */
static inline int64_t rs_tomb_find(const rs_tombstone *t, rs_key key) {
    uint32_t i = rs_tomb_home(t, key);
    for (;;) {
        uint32_t p = t->set[i];
        if (p == 0) return -1;
        if (rs_key_eq(t->ring[p - 1].key, key)) return i;
        i = (i + 1) & t->set_mask;
    }
}

static inline int rs_tomb_contains(const rs_tombstone *t, rs_key key) {
    return rs_tomb_find(t, key) >= 0;
}

/* Home slot of the grave at ring position `p` - 1 (a set slot's reference). */
static inline uint32_t rs_tomb_home_of(const void *owner, uint32_t p) {
    const rs_tombstone *t = (const rs_tombstone *)owner;
    return rs_tomb_home(t, t->ring[p - 1].key);
}

/* Remembers `key` as deleted at `now`, forgetting the oldest entry if full. */
static inline void rs_tomb_push(rs_tombstone *t, rs_key key, double now, double retry_window) {
    if (t->cap == 0) return;
    uint32_t pos;
    if (t->count == t->cap) {
        pos = t->oldest;
        rs_grave *victim = &t->ring[pos];
        int64_t slot = rs_tomb_find(t, victim->key);
        if (slot >= 0) rs_backshift(t->set, t->set_mask, (uint32_t)slot, 0, rs_tomb_home_of, t);
        t->overwritten++;
        if (now - victim->when < retry_window) t->young_overwrites++;
        t->oldest = (t->oldest + 1 == t->cap) ? 0 : t->oldest + 1;
    } else {
        uint64_t p = (uint64_t)t->oldest + t->count;
        pos = (uint32_t)(p >= t->cap ? p - t->cap : p);
        t->count++;
    }
    t->ring[pos].key = key;
    t->ring[pos].when = now;
    uint32_t i = rs_tomb_home(t, key);
    while (t->set[i] != 0) i = (i + 1) & t->set_mask;
    t->set[i] = pos + 1;
}

/* Age of the oldest remembered delete: how far back "delete sticks" reaches. */
static inline double rs_tomb_horizon(const rs_tombstone *t, double now) {
    return t->count ? now - t->ring[t->oldest].when : 0.0;
}

static inline size_t rs_tomb_bytes(const rs_tombstone *t) { return (size_t)rs_tomb_bytes_for(t->cap); }

#endif /* RS_TOMBSTONE_H */
