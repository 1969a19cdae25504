"""Many threads, random operations on overlapping ids; invariants afterwards.

The threads switch between operations (an operation lets the GIL go only to
wait for a lock another thread holds), so every operation must look atomic
to the others, and the invariants must hold afterwards.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

from rollout_sessions.registry import CREATED, DELETED, Registry

THREADS = 8
OPS = 20_000
IDS = [f"shared-{i}" for i in range(400)]


def test_concurrent_operations_keep_invariants():
    reg = Registry(shards=4, tombstone_capacity=1 << 16)
    barrier = threading.Barrier(THREADS)
    lock = threading.Lock()
    created: list[object] = []  # every object that became live
    removed: list[tuple[str, object]] = []
    minted: list[str] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine_created, mine_removed, mine_minted = [], [], []
        barrier.wait()
        try:
            for _ in range(OPS):
                sid = rng.choice(IDS)
                op = rng.random()
                if op < 0.25:
                    obj = object()
                    if reg.create(sid, obj) is CREATED:
                        mine_created.append(obj)
                elif op < 0.45:
                    made = []

                    def factory(made=made):
                        made.append(object())
                        return made[-1]

                    got = reg.get_or_create(sid, factory)
                    if made and got is made[0]:
                        mine_created.append(got)
                elif op < 0.65:
                    got = reg.remove(sid)
                    if got is not None:
                        mine_removed.append((sid, got))
                elif op < 0.7:
                    obj = object()
                    mine_minted.append(reg.mint(obj))
                    mine_created.append(obj)
                elif op < 0.75 and mine_minted:
                    victim = rng.choice(mine_minted)
                    got = reg.remove(victim)
                    if got is not None:
                        mine_removed.append((victim, got))
                else:
                    reg.lookup(sid)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
        with lock:
            created.extend(mine_created)
            removed.extend(mine_removed)
            minted.extend(mine_minted)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    # Delete sticks: no id was ever removed twice, and each removed id stays deleted.
    times_removed = Counter(sid for sid, _ in removed)
    assert max(times_removed.values()) == 1
    for sid in times_removed:
        assert reg.lookup(sid) is DELETED

    # Conservation: everything that became live is either removed or still live.
    created_ids = {id(o) for o in created}
    removed_ids = [id(o) for _, o in removed]
    assert len(set(removed_ids)) == len(removed_ids)
    assert set(removed_ids) <= created_ids
    assert len(reg) == len(created) - len(removed)

    # Minted ids are unique across threads.
    assert len(set(minted)) == len(minted)

    # Every shared id is in exactly one state, consistent with the history.
    for sid in IDS:
        state = reg.lookup(sid)
        if sid in times_removed:
            assert state is DELETED
        else:
            assert state is not DELETED
    stats = reg.stats()
    assert stats["live"] == len(reg)
    assert stats["deletes"] == len(removed)
    foreign_deletes = sum(1 for sid, _ in removed if not reg.is_self_minted(sid))
    assert stats["tombstones"] == foreign_deletes


def test_concurrent_mint_and_remove_of_own_ids():
    reg = Registry(shards=8)
    per_thread = 20_000
    results: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []  # asserted in the main thread: a thread's assert is only a warning

    def worker(slot: int) -> None:
        out = results[slot]
        for _ in range(per_thread):
            sid = reg.mint(object())
            out.append(sid)
            if len(out) % 2 == 0:
                if reg.remove(out[-2]) is None:
                    failures.append(f"remove({out[-2]}) found nothing")
                if reg.lookup(out[-2]) is not DELETED:
                    failures.append(f"{out[-2]} not DELETED after remove")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    all_ids = [s for out in results for s in out]
    assert len(set(all_ids)) == 4 * per_thread
    assert len(reg) == 2 * per_thread
    assert reg.stats()["tombstones"] == 0
