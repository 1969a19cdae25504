"""What the journal and the cluster need of the registry: instance tags in minted
ids, secrets and the mint counter kept across a restart, restoring sessions and
deleted ids, and hearing of evictions."""

from __future__ import annotations

import pytest

from rollout_sessions.registry import DELETED, NEVER_SEEN, Registry


def test_minted_ids_carry_the_instance_tag():
    for tag in (0, 7, 0xABC, 4095):
        reg = Registry(shards=2, instance_tag=tag)
        sid = reg.mint(object())
        assert sid[:3] == f"{tag:03x}"
        assert reg.is_self_minted(sid)
    with pytest.raises(ValueError):
        Registry(instance_tag=4096)


def test_another_instance_takes_our_ids_for_foreign_ones():
    secrets = Registry().secrets
    ours = Registry(instance_tag=1, secrets=secrets)
    theirs = Registry(instance_tag=2, secrets=secrets)
    sid = ours.mint(object())
    assert not theirs.is_self_minted(sid)
    assert theirs.lookup(sid) is NEVER_SEEN


def test_same_secrets_and_counter_recognise_ids_minted_before():
    before = Registry(shards=4, instance_tag=3)
    gone = before.mint(object())
    kept = before.mint(object())
    assert before.remove(gone) is not None
    after = Registry(
        shards=4, instance_tag=3, secrets=before.secrets, mint_counter=before.mint_counter
    )
    assert after.is_self_minted(gone) and after.is_self_minted(kept)
    assert after.lookup(gone) is DELETED  # no tombstone needed: it is ours and not live
    assert after.stats()["tombstones"] == 0
    # New mints never repeat an old id.
    assert after.mint(object()) not in (gone, kept)
    # A fresh registry (new secrets) sees them as foreign.
    assert Registry(instance_tag=3).lookup(gone) is NEVER_SEEN


def test_restore_keeps_the_idle_clock():
    reg = Registry(shards=1, ttl=100.0, manual_clock=True)
    old, new = object(), object()
    assert reg.restore("old", old, idle_s=90.0)
    assert reg.restore("new", new, idle_s=10.0)
    assert not reg.restore("new", object())  # live already
    reg.advance(20.0)
    assert reg.expire() == 1
    assert reg.lookup("old") is NEVER_SEEN
    assert reg.lookup("new") is new


def test_restore_deleted_keys_stick():
    first = Registry(tombstone_capacity=8)
    assert first.create("foreign-1", object()) is not None
    key = first.key_of("foreign-1")
    first.remove("foreign-1")
    second = Registry(tombstone_capacity=8, secrets=first.secrets)
    assert second.key_of("foreign-1") == key
    second.restore_deleted(key, age_s=5.0)
    assert second.lookup("foreign-1") is DELETED
    assert second.stats()["horizon_s"] >= 5.0


def test_on_evict_hears_every_idle_eviction_with_its_key():
    heard: list[bytes] = []
    reg = Registry(shards=2, ttl=10.0, manual_clock=True, on_evict=heard.append)
    for sid in ("a", "b", "c"):
        reg.create(sid, object())
    keys = {reg.key_of(sid) for sid in ("a", "b", "c")}
    reg.advance(11.0)
    assert reg.lookup("a") is NEVER_SEEN  # evicted on the spot
    reg.expire()
    assert set(heard) == keys and len(heard) == 3
    removed = reg.create("d", object())
    assert removed is not None and reg.remove("d") is not None
    assert len(heard) == 3  # a delete is not an eviction
