"""The routing model and the HAProxy configuration built from it (no HAProxy needed)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout_sessions.cluster.balancer import Instance, haproxy_config, route
from rollout_sessions.cluster.supervisor import ClusterError, parse_instance
from rollout_sessions.config import Settings

HEX = "0123456789abcdef"


@given(tags=st.lists(st.integers(0, 4095), min_size=1, max_size=16, unique=True), data=st.data())
def test_a_minted_id_with_a_known_tag_goes_to_its_instance(
    tags: list[int], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(tags) - 1))
    rest = data.draw(st.text(alphabet=HEX, min_size=29, max_size=29))
    assert route(f"{tags[k]:03x}{rest}", tags) == k


@given(sid=st.text(alphabet=HEX + "ABCDEFxyz-._~:", min_size=1, max_size=128), n=st.integers(1, 9))
def test_any_other_id_goes_by_crc32(sid: str, n: int) -> None:
    tags = [100 + k for k in range(n)]  # no id below starts with these prefixes
    if len(sid) == 32 and all(c in HEX for c in sid) and int(sid[:3], 16) in tags:
        return
    assert route(sid, tags) == zlib.crc32(sid.encode()) % n


def test_ids_that_only_look_minted_are_hashed() -> None:
    tags = [0, 1, 2]
    for sid in ("001" + "A" * 29, "001" + "a" * 28, "001" + "a" * 30, "fff" + "a" * 29):
        assert route(sid, tags) == zlib.crc32(sid.encode()) % 3


def test_config_routes_each_tag_and_checks_each_instance() -> None:
    instances = [Instance(5, "10.0.0.1", 8001), Instance(0, "10.0.0.2", 8001)]
    text = haproxy_config(instances, "0.0.0.0", 8000, Settings(max_body_bytes=1 << 20))
    assert "bind 0.0.0.0:8000" in text
    assert "set-var(txn.idx) int(0) if sid_minted { var(txn.sid) -m beg 005 }" in text
    assert "set-var(txn.idx) int(1) if sid_minted { var(txn.sid) -m beg 000 }" in text
    assert "crc32,mod(2)" in text
    assert "req.hdr_val(content-length) gt 1048576" in text
    assert text.count("option httpchk") == 2
    assert "timeout server 610s" in text  # past the default 600-s upstream timeout
    pool = text.split("\nbackend any\n")[1].split("\nbackend instance0\n")[0]
    assert "option redispatch 1" in pool  # mints only: any instance will do
    assert "no option redispatch" in text.split("\nfrontend")[0]


@pytest.mark.parametrize(("n", "threads"), [(1, 1), (5, 1), (6, 2), (16, 4)])
def test_one_balancer_thread_per_five_instances(n: int, threads: int) -> None:
    instances = [Instance(k, "10.0.0.1", 9000 + k) for k in range(n)]
    text = haproxy_config(instances, "0.0.0.0", 8000, Settings())
    assert f"\n    nbthread {threads}\n" in text.split("\ndefaults\n")[0]


def test_config_refuses_duplicate_tags_and_no_instances() -> None:
    with pytest.raises(ValueError, match="unique"):
        haproxy_config([Instance(1, "a", 1), Instance(1, "b", 2)], "h", 1, Settings())
    with pytest.raises(ValueError, match="at least one"):
        haproxy_config([], "h", 1, Settings())


def test_instance_addresses_parse() -> None:
    assert parse_instance("host-a:8001", 3) == Instance(3, "host-a", 8001)
    assert parse_instance("4095@10.1.2.3:1", 0) == Instance(4095, "10.1.2.3", 1)
    for bad in ("host", "host:0", "4096@h:1", "h:70000", "x@h:1", ":80"):
        with pytest.raises(ClusterError):
            parse_instance(bad, 0)
