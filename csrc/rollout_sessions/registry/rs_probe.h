/* Linear probing over a power-of-two index of 32-bit slots.
 *
 * Both the shard tables and the tombstone set keep an index whose slots hold
 * a 32-bit reference to the stored item (an entry position, a ring position)
 * or an `empty` marker. Deletion is backward-shift (Knuth, TAOCP 6.4,
 * Algorithm R): the index never holds a dummy slot, so probe chains stay as
 * short as the load allows however many deletes there were.
 */
#ifndef RS_PROBE_H
#define RS_PROBE_H

#include <stdint.h>

/* The home slot of the item a slot refers to. */
typedef uint32_t (*rs_home_fn)(const void *owner, uint32_t ref);

/* Empties slot `hole`, then pulls later members of its cluster back into the
 * hole whenever their home slot does not lie cyclically in (hole, j]. */
static inline void rs_backshift(uint32_t *slots, uint32_t mask, uint32_t hole, uint32_t empty,
                                rs_home_fn home, const void *owner) {
    uint32_t j = hole;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t ref = slots[j];
        if (ref == empty) break;
        if (((j - home(owner, ref)) & mask) >= ((j - hole) & mask)) {
            slots[hole] = ref;
            hole = j;
        }
    }
    slots[hole] = empty;
}

#endif /* RS_PROBE_H */
