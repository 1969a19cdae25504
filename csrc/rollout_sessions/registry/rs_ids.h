/* Session ids: validation, 128-bit keys, keyed hashing, self-recognising mints.
 *
 * Every id becomes a 128-bit key. A 32-lowercase-hex id is parsed exactly
 * (all 128 bits kept); any other valid id is hashed with two keyed SipHash-2-4
 * runs. A minted id is `instance tag (12 bits) || payload (52 bits) || check`
 * where check = SipHash of the first 64 bits under the registry's key, so
 * the registry recognises its own ids without storing them. The key lives
 * as long as the journal keeps it; a registry with a new key (or another
 * instance tag) takes old ids for foreign ones.
 *
 * Pure C, no Python API: everything here may run without the GIL.
 */
#ifndef RS_IDS_H
#define RS_IDS_H

#include <stddef.h>
#include <stdint.h>

#define RS_MAX_ID_LEN 128
#define RS_HEX_ID_LEN 32

typedef struct {
    uint64_t hi;
    uint64_t lo;
} rs_key;

/* Outcome of rs_validate: 0 is valid, the others name the reason. */
enum { RS_ID_OK = 0, RS_ID_EMPTY = 1, RS_ID_TOO_LONG = 2, RS_ID_BAD_CHAR = 3, RS_ID_DOT_SEGMENT = 4 };

static inline uint64_t rs_rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

static inline uint64_t rs_load_le64(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define RS_SIPROUND                                                                  \
    do {                                                                             \
        v0 += v1; v1 = rs_rotl(v1, 13); v1 ^= v0; v0 = rs_rotl(v0, 32);              \
        v2 += v3; v3 = rs_rotl(v3, 16); v3 ^= v2;                                    \
        v0 += v3; v3 = rs_rotl(v3, 21); v3 ^= v0;                                    \
        v2 += v1; v1 = rs_rotl(v1, 17); v1 ^= v2; v2 = rs_rotl(v2, 32);              \
    } while (0)

/* SipHash-2-4 (Aumasson & Bernstein, 2012). With `out_hi` non-NULL it is the
 * 128-bit-output variant: the second word costs four more rounds instead of
 * a second full pass, which is what a 128-bit id key needs. */
static inline uint64_t rs_siphash24_core(const uint8_t *in, size_t len, uint64_t k0, uint64_t k1,
                                         uint64_t *out_hi) {
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0;
    uint64_t v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0;
    uint64_t v3 = 0x7465646279746573ULL ^ k1;
    uint64_t last = ((uint64_t)len) << 56;
    size_t whole = len - (len & 7);
    if (out_hi) v1 ^= 0xee;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = rs_load_le64(in + i);
        v3 ^= m;
        RS_SIPROUND;
        RS_SIPROUND;
        v0 ^= m;
    }
    for (size_t i = 0; i < (len & 7); i++) last |= ((uint64_t)in[whole + i]) << (8 * i);
    v3 ^= last;
    RS_SIPROUND;
    RS_SIPROUND;
    v0 ^= last;
    v2 ^= out_hi ? 0xee : 0xff;
    RS_SIPROUND;
    RS_SIPROUND;
    RS_SIPROUND;
    RS_SIPROUND;
    uint64_t lo = v0 ^ v1 ^ v2 ^ v3;
    if (out_hi) {
        v1 ^= 0xdd;
        RS_SIPROUND;
        RS_SIPROUND;
        RS_SIPROUND;
        RS_SIPROUND;
        *out_hi = v0 ^ v1 ^ v2 ^ v3;
    }
    return lo;
}

static inline uint64_t rs_siphash24(const uint8_t *in, size_t len, uint64_t k0, uint64_t k1) {
    return rs_siphash24_core(in, len, k0, k1, NULL);
}

static inline uint64_t rs_siphash_u64(uint64_t x, uint64_t k0, uint64_t k1) {
    uint8_t buf[8];
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(x >> (8 * i));
    return rs_siphash24(buf, 8, k0, k1);
}

/* Character tables: per-character work of validation and parsing is one
 * load, not a chain of range compares. */
static const uint8_t rs_id_ok[256] = {
    ['-'] = 1, ['.'] = 1, ['_'] = 1, ['~'] = 1, [':'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1,
    ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1,
    ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1,
    ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1,
    ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,
    ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
};

/* Value + 1 of a lowercase hex digit; 0 for anything else. */
static const uint8_t rs_hex_plus1[256] = {
    ['0'] = 1, ['1'] = 2, ['2'] = 3, ['3'] = 4, ['4'] = 5, ['5'] = 6, ['6'] = 7, ['7'] = 8,
    ['8'] = 9, ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
};

static inline int rs_id_char_ok(uint8_t c) { return rs_id_ok[c]; }

/* Returns RS_ID_OK or the reason; *bad_at receives the offending index. */
static inline int rs_validate(const uint8_t *s, size_t len, size_t *bad_at) {
    if (len == 0) return RS_ID_EMPTY;
    if (len > RS_MAX_ID_LEN) return RS_ID_TOO_LONG;
    for (size_t i = 0; i < len; i++) {
        if (!rs_id_char_ok(s[i])) {
            *bad_at = i;
            return RS_ID_BAD_CHAR;
        }
    }
    /* "." and "..": HTTP clients remove them from a path, so no request could
     * ever address a session under either id. */
    if (s[0] == '.' && (len == 1 || (len == 2 && s[1] == '.'))) return RS_ID_DOT_SEGMENT;
    return RS_ID_OK;
}

static inline int rs_hex_val(uint8_t c) { return (int)rs_hex_plus1[c] - 1; }

/* Parses 32 lowercase hex digits exactly; returns 0 if `s` is not of that form. */
static inline int rs_parse_hex128(const uint8_t *s, size_t len, rs_key *out) {
    if (len != RS_HEX_ID_LEN) return 0;
    uint64_t parts[2] = {0, 0};
    for (size_t i = 0; i < RS_HEX_ID_LEN; i++) {
        int v = rs_hex_val(s[i]);
        if (v < 0) return 0;
        parts[i >> 4] = (parts[i >> 4] << 4) | (uint64_t)v;
    }
    out->hi = parts[0];
    out->lo = parts[1];
    return 1;
}

static inline void rs_format_hex128(rs_key key, uint8_t *out) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[i] = (uint8_t)digits[(key.hi >> (60 - 4 * i)) & 0xf];
        out[16 + i] = (uint8_t)digits[(key.lo >> (60 - 4 * i)) & 0xf];
    }
}

/* The registry's secrets (kept by the journal across restarts) and its
 * instance tag. Distinct keys keep the three uses independent. */
typedef struct {
    uint64_t mint_k0, mint_k1;   /* check value of minted ids */
    uint64_t name_k0, name_k1;   /* 128-bit key of non-hex ids */
    uint64_t slot_k0, slot_k1;   /* table / shard / tombstone-set hashing */
    uint64_t mint_base;          /* first payload; payloads are base + counter (mod 2^52) */
    uint64_t tag;                /* instance tag, 0..4095: the id's first 3 hex digits */
} rs_secrets;

/* A minted id's high word: 12 bits of instance tag, then a 52-bit payload. */
#define RS_TAG_SHIFT 52
#define RS_PAYLOAD_MASK ((1ULL << RS_TAG_SHIFT) - 1)
#define RS_MAX_TAG 4095

static inline rs_key rs_key_of_name(const rs_secrets *sec, const uint8_t *s, size_t len) {
    rs_key key;
    key.lo = rs_siphash24_core(s, len, sec->name_k0, sec->name_k1, &key.hi);
    return key;
}

static inline rs_key rs_minted_key(const rs_secrets *sec, uint64_t counter) {
    rs_key key;
    key.hi = (sec->tag << RS_TAG_SHIFT) | ((sec->mint_base + counter) & RS_PAYLOAD_MASK);
    key.lo = rs_siphash_u64(key.hi, sec->mint_k0, sec->mint_k1);
    return key;
}

/* A hex key is self-minted iff it carries our instance tag, its payload was
 * handed out and its check value is right. A random foreign id passes the
 * check with probability 2^-64. */
static inline int rs_is_self_minted(const rs_secrets *sec, rs_key key, uint64_t minted) {
    if ((key.hi >> RS_TAG_SHIFT) != sec->tag) return 0;
    if (((key.hi - sec->mint_base) & RS_PAYLOAD_MASK) >= minted) return 0;
    return rs_siphash_u64(key.hi, sec->mint_k0, sec->mint_k1) == key.lo;
}

/* Murmur3's 64-bit finaliser: a cheap bijective mixer. */
static inline uint64_t rs_fmix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Slot hash of a key. Keyed, because hex ids are chosen by clients and an
 * unkeyed hash would let them aim for one probe chain. */
static inline uint64_t rs_slot_hash(const rs_secrets *sec, rs_key key) {
    return rs_fmix64(key.hi ^ sec->slot_k0 ^ rs_fmix64(key.lo ^ sec->slot_k1));
}

static inline int rs_key_eq(rs_key a, rs_key b) { return a.hi == b.hi && a.lo == b.lo; }

/* The mint counter is shared by all threads and needs no lock. */
static inline uint64_t rs_counter_next(uint64_t *c) { return __atomic_fetch_add(c, 1, __ATOMIC_RELAXED); }
static inline uint64_t rs_counter_load(const uint64_t *c) { return __atomic_load_n(c, __ATOMIC_ACQUIRE); }

#endif /* RS_IDS_H */
