"""Scale: one million live sessions and one million tombstones in one process."""

from __future__ import annotations

import random

import pytest

from rollout_sessions.registry import DELETED, NEVER_SEEN, Registry
from rollout_sessions.sessions.session import Session

N = 1_000_000


@pytest.mark.slow
def test_million_live_and_million_tombstones():
    reg = Registry(shards=64, tombstone_capacity=N)
    live = [reg.mint(Session()) for _ in range(N)]
    foreign = [f"restart-{i}" for i in range(N)]
    for sid in foreign:
        reg.create(sid, None)
    for sid in foreign:
        reg.remove(sid)
    stats = reg.stats()
    assert stats["live"] == N
    assert stats["tombstones"] == N
    assert stats["overwritten"] == 0
    # Ring of 1M: 24 B per entry plus a 2M-slot int32 set = 32 MiB.
    assert stats["tombstone_bytes"] == 24 * N + 4 * (1 << 21)
    rng = random.Random(7)
    for sid in rng.sample(live, 2000):
        assert isinstance(reg.lookup(sid), Session)
    for sid in rng.sample(foreign, 2000):
        assert reg.lookup(sid) is DELETED
    assert reg.lookup("restart-never") is NEVER_SEEN
    # One more foreign delete pushes out exactly the oldest.
    reg.create("one-more", None)
    reg.remove("one-more")
    assert reg.lookup(foreign[0]) is NEVER_SEEN
    assert reg.lookup(foreign[1]) is DELETED
