"""Stateful property test: the Cython registry against a plain-Python model.

The model is the production PR's structure (dict + deque + set), extended
with the self-minted rule and a manual clock for idle TTL. Small capacities
and few shards exercise ring wrap-around and table growth/shrink.
"""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from rollout_sessions.registry import CREATED, DELETED, LIVE, NEVER_SEEN, Registry

TTL = 10.0
WINDOW = 5.0
CAPACITY = 5

FOREIGN = [f"agent-{i}" for i in range(12)] + [f"{i:032x}" for i in range(1, 5)]


class Model:
    def __init__(self) -> None:
        self.live: dict[str, tuple[object, float]] = {}
        self.minted: set[str] = set()
        self.ring: deque[tuple[str, float]] = deque()
        self.ring_set: set[str] = set()
        self.now = 0.0
        self.young_overwrites = 0

    def _live(self, sid: str):
        entry = self.live.get(sid)
        if entry is None:
            return None
        if self.now - entry[1] > TTL:
            del self.live[sid]
            return None
        return entry[0]

    def _deleted(self, sid: str) -> bool:
        return sid in self.minted or sid in self.ring_set

    def lookup(self, sid: str):
        obj = self._live(sid)
        if obj is not None:
            self.live[sid] = (obj, self.now)
            return obj
        return DELETED if self._deleted(sid) else NEVER_SEEN

    def create(self, sid: str, obj):
        if self._live(sid) is not None:
            return LIVE
        if self._deleted(sid):
            return DELETED
        self.live[sid] = (obj, self.now)
        return CREATED

    def get_or_create(self, sid: str, obj):
        found = self.lookup(sid)
        if found is NEVER_SEEN:
            self.live[sid] = (obj, self.now)
            return obj
        return found

    def remove(self, sid: str):
        obj = self._live(sid)
        if obj is None:
            return None
        del self.live[sid]
        if sid not in self.minted:
            if len(self.ring) == CAPACITY:
                old, when = self.ring.popleft()
                self.ring_set.discard(old)
                if self.now - when < WINDOW:
                    self.young_overwrites += 1
            self.ring.append((sid, self.now))
            self.ring_set.add(sid)
        return obj

    def expire_all(self) -> None:
        for sid in [s for s, (_, t) in self.live.items() if self.now - t > TTL]:
            del self.live[sid]


class RegistryMachine(RuleBasedStateMachine):
    minted_ids = Bundle("minted_ids")

    def __init__(self) -> None:
        super().__init__()
        self.reg = Registry(
            shards=2, tombstone_capacity=CAPACITY, retry_window=WINDOW, ttl=TTL, manual_clock=True
        )
        self.model = Model()

    any_id = st.sampled_from(FOREIGN)

    @rule(target=minted_ids)
    def mint(self):
        obj = object()
        sid = self.reg.mint(obj)
        assert sid not in self.model.minted
        self.model.minted.add(sid)
        self.model.live[sid] = (obj, self.model.now)
        return sid

    def _check_lookup(self, sid):
        assert self.reg.lookup(sid) is self.model.lookup(sid)

    @rule(sid=any_id)
    def lookup_foreign(self, sid):
        self._check_lookup(sid)

    @rule(sid=minted_ids)
    def lookup_minted(self, sid):
        self._check_lookup(sid)

    @rule(sid=st.one_of(any_id, minted_ids))
    def create(self, sid):
        obj = object()
        assert self.reg.create(sid, obj) is self.model.create(sid, obj)

    @rule(sid=st.one_of(any_id, minted_ids))
    def get_or_create(self, sid):
        obj = object()
        assert self.reg.get_or_create(sid, lambda: obj) is self.model.get_or_create(sid, obj)

    @rule(sid=st.one_of(any_id, minted_ids))
    def remove(self, sid):
        assert self.reg.remove(sid) is self.model.remove(sid)

    @rule(dt=st.sampled_from([0.0, 1.0, 4.0, 6.0, 10.0, 11.0]))
    def advance(self, dt):
        self.reg.advance(dt)
        self.model.now += dt

    @precondition(lambda self: self.model.live)
    @rule()
    def expire(self):
        while self.reg.expire(budget=3):
            pass
        self.model.expire_all()
        assert len(self.reg) == len(self.model.live)

    @invariant()
    def tombstone_stats_agree(self):
        stats = self.reg.stats()
        assert stats["tombstones"] == len(self.model.ring)
        assert stats["young_overwrites"] == self.model.young_overwrites
        if self.model.ring:
            assert abs(stats["horizon_s"] - (self.model.now - self.model.ring[0][1])) < 1e-9

    @invariant()
    def live_objects_agree(self):
        for sid, (obj, _) in list(self.model.live.items()):
            if self.model.now - self.model.live[sid][1] <= TTL:
                # Peek without refreshing either side: refresh both identically.
                assert self.reg.lookup(sid) is self.model.lookup(sid) is obj


RegistryMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
TestRegistryAgainstModel = RegistryMachine.TestCase
