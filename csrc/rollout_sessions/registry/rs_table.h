/* One shard of the live-session table.
 *
 * Layout follows CPython's compact dict: a dense array of entries with
 * stable positions, and a separate open-addressing index (linear probing,
 * int32 entry positions, load <= 1/2) that is cheap to rebuild. Entries are
 * threaded on a doubly linked LRU list (oldest access first), so idle-TTL
 * eviction pops expired entries off the head in O(1) each and never scans.
 *
 * Deletion uses backward-shift in the index (rs_probe.h), so the index
 * holds no dummy slots and probe chains never rot. A shard grows (and shrinks) by itself by
 * rebuilding only its own arrays: one shard's rebuild never touches another.
 *
 * The caller holds the shard's lock; nothing here touches Python state, so
 * it all runs without the GIL. Stored objects are opaque pointers whose
 * references the caller manages with the GIL held.
 */
#ifndef RS_TABLE_H
#define RS_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rs_ids.h"
#include "rs_probe.h"

#define RS_NIL (-1)
#define RS_MIN_CAP 8

typedef struct {
    rs_key key;
    void *obj;      /* NULL marks a free entry */
    double last;    /* last access on the registry clock */
    int32_t prev;   /* LRU neighbours; `next` doubles as the free-list link */
    int32_t next;
} rs_entry;

typedef struct {
    rs_entry *entries;
    int32_t *index;     /* entry position per slot, RS_NIL when empty */
    uint32_t mask;      /* index size - 1; index size = 2 * cap */
    uint32_t cap;       /* entry slots allocated */
    uint32_t used;      /* entry slots ever handed out since the last rebuild */
    uint32_t live;
    int32_t free_head;
    int32_t lru_head;   /* least recently used */
    int32_t lru_tail;
    const rs_secrets *sec;
} rs_table;

static inline uint32_t rs_home(const rs_table *t, rs_key key) {
    return (uint32_t)rs_slot_hash(t->sec, key) & t->mask;
}

static inline int rs_table_alloc(rs_table *t, uint32_t cap) {
    rs_entry *entries = (rs_entry *)malloc(sizeof(rs_entry) * cap);
    int32_t *index = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)cap);
    if (!entries || !index) {
        free(entries);
        free(index);
        return -1;
    }
    memset(index, 0xff, sizeof(int32_t) * 2 * (size_t)cap); /* all RS_NIL */
    t->entries = entries;
    t->index = index;
    t->cap = cap;
    t->mask = 2 * cap - 1;
    return 0;
}

static inline int rs_table_init(rs_table *t, const rs_secrets *sec) {
    memset(t, 0, sizeof(*t));
    t->sec = sec;
    t->free_head = t->lru_head = t->lru_tail = RS_NIL;
    return rs_table_alloc(t, RS_MIN_CAP);
}

static inline void rs_table_free(rs_table *t) {
    free(t->entries);
    free(t->index);
    t->entries = NULL;
    t->index = NULL;
}

/* Home slot of the entry at position `e` (an index slot's reference). */
static inline uint32_t rs_table_home_of(const void *owner, uint32_t e) {
    const rs_table *t = (const rs_table *)owner;
    return rs_home(t, t->entries[e].key);
}

/* Index slot holding `key`, or the negated (slot + 1) where it would go. */
static inline int64_t rs_table_probe(const rs_table *t, rs_key key, uint32_t home) {
    uint32_t i = home;
    for (;;) {
        int32_t e = t->index[i];
        if (e == RS_NIL) return -(int64_t)i - 1;
        if (rs_key_eq(t->entries[e].key, key)) return i;
        i = (i + 1) & t->mask;
    }
}

static inline void rs_lru_unlink(rs_table *t, int32_t e) {
    rs_entry *x = &t->entries[e];
    if (x->prev != RS_NIL) t->entries[x->prev].next = x->next; else t->lru_head = x->next;
    if (x->next != RS_NIL) t->entries[x->next].prev = x->prev; else t->lru_tail = x->prev;
}

static inline void rs_lru_append(rs_table *t, int32_t e) {
    rs_entry *x = &t->entries[e];
    x->prev = t->lru_tail;
    x->next = RS_NIL;
    if (t->lru_tail != RS_NIL) t->entries[t->lru_tail].next = e; else t->lru_head = e;
    t->lru_tail = e;
}

/* Marks an access: refreshes the clock and moves the entry to the LRU tail. */
static inline void rs_table_touch(rs_table *t, int32_t e, double now) {
    t->entries[e].last = now;
    if (t->lru_tail != e) {
        rs_lru_unlink(t, e);
        rs_lru_append(t, e);
    }
}

/* Rebuilds into `cap` entry slots, compacting entries in LRU order. O(live). */
static inline int rs_table_rebuild(rs_table *t, uint32_t cap) {
    rs_table fresh = *t;
    if (rs_table_alloc(&fresh, cap) < 0) return -1;
    int32_t n = 0;
    for (int32_t e = t->lru_head; e != RS_NIL; e = t->entries[e].next, n++) {
        rs_entry *dst = &fresh.entries[n];
        *dst = t->entries[e];
        dst->prev = n - 1;
        dst->next = RS_NIL;
        if (n > 0) fresh.entries[n - 1].next = n;
        uint32_t i = rs_home(&fresh, dst->key);
        while (fresh.index[i] != RS_NIL) i = (i + 1) & fresh.mask;
        fresh.index[i] = n;
    }
    rs_table_free(t);
    fresh.used = (uint32_t)n;
    fresh.live = (uint32_t)n;
    fresh.free_head = RS_NIL;
    fresh.lru_head = n ? 0 : RS_NIL;
    fresh.lru_tail = n - 1 >= 0 ? n - 1 : RS_NIL;
    *t = fresh;
    return 0;
}

/* Inserts a key known to be absent. Returns its entry, or RS_NIL when memory ran out. */
static inline int32_t rs_table_insert(rs_table *t, rs_key key, void *obj, double now) {
    if (t->free_head == RS_NIL && t->used == t->cap) {
        if (t->cap >= 0x40000000u || rs_table_rebuild(t, t->cap * 2) < 0) return RS_NIL;
    }
    int32_t e;
    if (t->free_head != RS_NIL) {
        e = t->free_head;
        t->free_head = t->entries[e].next;
    } else {
        e = (int32_t)t->used++;
    }
    rs_entry *x = &t->entries[e];
    x->key = key;
    x->obj = obj;
    x->last = now;
    rs_lru_append(t, e);
    uint32_t i = rs_home(t, key);
    while (t->index[i] != RS_NIL) i = (i + 1) & t->mask;
    t->index[i] = e;
    t->live++;
    return e;
}

/* Removes the entry at index slot `slot`; returns its object (the caller
 * now owns the table's reference). Shrinks a mostly empty shard. */
static inline void *rs_table_delete_slot(rs_table *t, uint32_t slot) {
    int32_t e = t->index[slot];
    rs_entry *x = &t->entries[e];
    void *obj = x->obj;
    rs_lru_unlink(t, e);
    x->obj = NULL;
    x->next = t->free_head;
    t->free_head = e;
    t->live--;
    rs_backshift((uint32_t *)t->index, t->mask, slot, (uint32_t)RS_NIL, rs_table_home_of, t);
    if (t->cap > RS_MIN_CAP && t->live < t->cap / 8) {
        /* Best effort: on allocation failure the shard simply stays large. */
        rs_table_rebuild(t, t->cap / 4 > RS_MIN_CAP ? t->cap / 4 : RS_MIN_CAP);
    }
    return obj;
}

static inline int rs_table_expired(const rs_table *t, int32_t e, double now, double ttl) {
    return now - t->entries[e].last > ttl;
}

/* Index slot of the least recently used entry if it is idle past `ttl`, else -1. */
static inline int64_t rs_table_expired_head(const rs_table *t, double now, double ttl) {
    int32_t e = t->lru_head;
    if (e == RS_NIL || !rs_table_expired(t, e, now, ttl)) return -1;
    return rs_table_probe(t, t->entries[e].key, rs_home(t, t->entries[e].key));
}

static inline size_t rs_table_bytes(const rs_table *t) {
    return sizeof(rs_entry) * (size_t)t->cap + sizeof(int32_t) * 2 * (size_t)t->cap;
}

#endif /* RS_TABLE_H */
