"""Outcome-by-outcome tests of the Cython registry."""

from __future__ import annotations

import gc
import re
import sys

import pytest

from rollout_sessions.registry import CREATED, DELETED, LIVE, NEVER_SEEN, Registry, validate_id
from rollout_sessions.registry._registry import siphash24


class Obj:
    """A session stand-in whose identity the tests can follow."""


def make(**kw) -> Registry:
    kw.setdefault("shards", 4)
    kw.setdefault("tombstone_capacity", 16)
    kw.setdefault("manual_clock", True)
    return Registry(**kw)


def test_siphash_reference_vectors():
    # Vectors from the SipHash paper's reference implementation: key 00..0f.
    key = bytes(range(16))
    assert siphash24(b"", key) == 0x726FDB47DD0E0E31
    assert siphash24(bytes(range(15)), key) == 0xA129CA6149BE45E5
    # The 128-bit-output variant, which keys non-hex ids.
    assert siphash24(b"", key, wide=True).hex() == "a3817f04ba25a8e66df67214c7550293"
    assert siphash24(bytes(range(15)), key, wide=True).hex() == "5493e99933b0a8117e08ec0f97cfc3d9"


def test_mint_is_32_lowercase_hex_unique_and_live():
    reg = make()
    objs = [Obj() for _ in range(1000)]
    ids = [reg.mint(o) for o in objs]
    assert len(set(ids)) == 1000
    for sid, obj in zip(ids, objs, strict=True):
        assert re.fullmatch(r"[0-9a-f]{32}", sid)
        assert reg.lookup(sid) is obj
        assert reg.is_self_minted(sid)
    assert len(reg) == 1000


def test_create_by_id_outcomes():
    reg = make()
    a, b = Obj(), Obj()
    assert reg.lookup("agent-1") is NEVER_SEEN
    assert reg.create("agent-1", a) is CREATED
    assert reg.create("agent-1", b) is LIVE
    assert reg.lookup("agent-1") is a
    assert reg.remove("agent-1") is a
    assert reg.create("agent-1", b) is DELETED
    assert reg.lookup("agent-1") is DELETED
    assert len(reg) == 0


def test_get_or_create_only_for_never_seen():
    reg = make()
    made = []

    def factory():
        made.append(Obj())
        return made[-1]

    first = reg.get_or_create("x", factory)
    assert first is made[0]
    assert reg.get_or_create("x", factory) is first
    assert len(made) == 1
    assert reg.stats()["auto_creates"] == 1
    reg.remove("x")
    assert reg.get_or_create("x", factory) is DELETED
    assert len(made) == 1, "a deleted id must not even build a session"


def test_remove_only_live():
    reg = make()
    assert reg.remove("nobody") is None
    sid = reg.mint(Obj())
    assert reg.remove(sid) is not None
    assert reg.remove(sid) is None
    assert reg.stats()["deletes"] == 1


def test_remove_with_expected_object():
    reg = make()
    a = Obj()
    reg.create("k", a)
    assert reg.remove("k", expected=Obj()) is None
    assert reg.lookup("k") is a
    assert reg.remove("k", expected=a) is a


def test_delete_sticks_when_eviction_wins_the_race():
    """DELETE held the session, then idle-TTL eviction took it before the remove."""
    reg = make(ttl=1.0)
    a, b = Obj(), Obj()
    reg.create("foreign", a)
    minted = reg.mint(b)
    reg.advance(2.0)
    assert reg.remove("foreign", expected=a) is None
    assert reg.remove(minted, expected=b) is None
    assert reg.lookup("foreign") is DELETED
    assert reg.lookup(minted) is DELETED
    assert reg.stats()["tombstones"] == 1  # the minted id needs none
    # Without `expected` the caller never saw the id: nothing is tombstoned.
    reg.create("other", Obj())
    reg.advance(2.0)
    assert reg.remove("other") is None
    assert reg.lookup("other") is NEVER_SEEN


def test_self_minted_ids_stick_past_any_capacity():
    reg = make(tombstone_capacity=4)
    ids = [reg.mint(Obj()) for _ in range(100)]
    for sid in ids:
        reg.remove(sid)
    stats = reg.stats()
    assert stats["tombstones"] == 0, "minted ids must not use the ring"
    for sid in ids:
        assert reg.lookup(sid) is DELETED
        assert reg.get_or_create(sid, Obj) is DELETED
        assert reg.create(sid, Obj()) is DELETED


def test_ring_wraparound_forgets_exactly_the_oldest():
    cap, k = 8, 3
    reg = make(tombstone_capacity=cap)
    names = [f"foreign-{i}" for i in range(cap + k)]
    for name in names:
        reg.create(name, Obj())
        reg.remove(name)
    for name in names[:k]:
        assert reg.lookup(name) is NEVER_SEEN
    for name in names[k:]:
        assert reg.lookup(name) is DELETED
    stats = reg.stats()
    assert stats["tombstones"] == cap
    assert stats["overwritten"] == k
    # A forgotten id behaves as never seen: it may be auto-created again.
    assert reg.get_or_create(names[0], Obj) is not DELETED


def test_foreign_hex_ids_are_exact():
    reg = make(tombstone_capacity=4)
    hex_id = "0123456789abcdef0123456789abcdef"
    reg.create(hex_id, Obj())
    reg.remove(hex_id)
    assert reg.lookup(hex_id) is DELETED
    assert reg.lookup("0123456789abcdef0123456789abcdee") is NEVER_SEEN
    assert not reg.is_self_minted(hex_id)


def test_ids_of_another_registry_are_foreign():
    """A restart is a new registry: its old minted ids count as never seen."""
    old, new = make(), make()
    sid = old.mint(Obj())
    old.remove(sid)
    assert not new.is_self_minted(sid)
    assert new.lookup(sid) is NEVER_SEEN
    assert new.get_or_create(sid, Obj) is not DELETED


def test_young_overwrites_and_horizon():
    reg = make(tombstone_capacity=2, retry_window=10.0)
    for name in ("a", "b"):
        reg.create(name, Obj())
        reg.remove(name)
        reg.advance(3.0)
    assert reg.stats()["horizon_s"] == pytest.approx(6.0)
    reg.create("c", Obj())
    reg.remove("c")  # overwrites "a", deleted 6 s ago: younger than the window
    assert reg.stats()["young_overwrites"] == 1
    reg.advance(20.0)
    reg.create("d", Obj())
    reg.remove("d")  # overwrites "b", now 23 s old: fine
    stats = reg.stats()
    assert stats["young_overwrites"] == 1
    assert stats["overwritten"] == 2
    assert stats["horizon_s"] == pytest.approx(20.0)  # "c" is now the oldest


def test_idle_ttl_refresh_and_expiry():
    reg = make(ttl=10.0)
    a = Obj()
    sid = reg.mint(a)
    reg.create("foreign", Obj())
    reg.advance(8.0)
    assert reg.lookup(sid) is a  # refreshes sid, not "foreign"
    reg.advance(8.0)
    assert reg.lookup(sid) is a
    assert reg.lookup("foreign") is NEVER_SEEN, "expired foreign ids are forgotten"
    reg.advance(10.5)
    assert reg.lookup(sid) is DELETED, "an expired minted id is not live: deleted"
    assert reg.stats()["ttl_evictions"] == 2
    assert len(reg) == 0


def test_expire_is_bounded_per_call():
    reg = make(ttl=1.0, shards=2)
    for _ in range(500):
        reg.mint(Obj())
    reg.advance(2.0)
    assert reg.expire(budget=100) == 100
    assert len(reg) == 400
    total = 100
    while True:
        n = reg.expire(budget=100)
        assert n <= 100
        if n == 0:
            break
        total += n
    assert total == 500
    assert len(reg) == 0


def test_expired_sessions_are_released():
    reg = make(ttl=1.0)
    obj = Obj()
    before = sys.getrefcount(obj)
    reg.mint(obj)
    assert sys.getrefcount(obj) == before + 1
    reg.advance(5.0)
    reg.expire()
    assert sys.getrefcount(obj) == before


def test_registry_drops_references_when_freed():
    obj = Obj()
    before = sys.getrefcount(obj)
    reg = make()
    reg.mint(obj)
    reg.create("named", obj)
    assert sys.getrefcount(obj) == before + 2
    del reg
    gc.collect()
    assert sys.getrefcount(obj) == before


def test_growth_and_shrink_keep_every_entry():
    reg = make(shards=1, tombstone_capacity=1 << 16)
    objs = {}
    for i in range(20000):
        name = f"n{i}"
        objs[name] = Obj()
        assert reg.create(name, objs[name]) is CREATED
    grown = reg.stats()["table_bytes"]
    for i in range(0, 20000, 2):
        assert reg.remove(f"n{i}") is objs[f"n{i}"]
    for i in range(20000):
        want = DELETED if i % 2 == 0 else objs[f"n{i}"]
        assert reg.lookup(f"n{i}") is want
    for i in range(1, 20000, 2):
        reg.remove(f"n{i}")
    assert len(reg) == 0
    assert reg.stats()["table_bytes"] < grown / 100, "an emptied shard gives memory back"


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("", "empty"),
        ("x" * 129, "129 characters"),
        ("a b", "character ' '"),
        ("a/b", "character '/'"),
        ("a%2Fb", "character '%'"),
        ("é", "character 'é'"),
        ("a\x00", "character"),
        (".", "'.' is a dot segment"),
        ("..", "'..' is a dot segment"),
    ],
)
def test_invalid_ids_raise_clear_value_error(bad, reason):
    reg = make()
    with pytest.raises(ValueError, match="invalid session id") as err:
        validate_id(bad)
    assert reason in str(err.value)
    for op in (reg.lookup, reg.remove, lambda s: reg.create(s, Obj())):
        with pytest.raises(ValueError):
            op(bad)
    with pytest.raises(ValueError):
        reg.get_or_create(bad, Obj)
    assert len(reg) == 0


@pytest.mark.parametrize("sid", [".", ".."])
def test_a_journaled_dot_segment_id_is_restored_not_refused(sid):
    # Journals written before dot segments were refused may hold one: the
    # start-up must not fail on it. Unreachable over HTTP, it expires by TTL.
    reg = make()
    assert reg.restore(sid, Obj()) is True
    assert len(reg) == 1
    with pytest.raises(ValueError, match="dot segment"):
        reg.lookup(sid)


def test_longest_and_all_allowed_characters_are_valid():
    reg = make()
    for sid in ("x" * 128, "AZaz09._~:-", "1"):
        validate_id(sid)
        assert reg.create(sid, Obj()) is CREATED


def test_non_string_id_rejected():
    with pytest.raises(ValueError):
        validate_id(b"abc")


def test_bad_configuration_rejected():
    with pytest.raises(ValueError):
        Registry(shards=0)
    with pytest.raises(ValueError):
        Registry(tombstone_capacity=0)
    with pytest.raises(ValueError):
        Registry(ttl=0)
    with pytest.raises(RuntimeError):
        Registry().advance(1.0)
