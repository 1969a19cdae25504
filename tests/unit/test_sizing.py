"""The tombstone sizing rule and its command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rollout_sessions.registry import Registry, tombstone_bytes
from rollout_sessions.sizing import recommend

RING_ENTRY = 24  # a 128-bit key and a double (the delete time)
SET_SLOT = 4  # a uint32 ring position per slot, at load <= 1/2


@pytest.mark.parametrize(
    ("capacity", "set_slots"),
    [(1, 2), (10_000, 32_768), (1 << 20, 1 << 21), (1_000_003, 1 << 21)],
)
def test_formula_is_ring_plus_half_loaded_set(capacity, set_slots):
    expected = RING_ENTRY * capacity + SET_SLOT * set_slots
    assert tombstone_bytes(capacity) == expected
    assert Registry(shards=1, tombstone_capacity=capacity).stats()["tombstone_bytes"] == expected


RESIDENT_PROBE = """
import sys
from rollout_sessions.registry import Registry

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

capacity = int(sys.argv[1])
ids = [f"foreign-{i}" for i in range(capacity)]
reg = Registry(shards=4, tombstone_capacity=capacity)
before = rss_kib()
for sid in ids:
    reg.create(sid, None)
    reg.remove(sid)
assert reg.stats()["tombstones"] == capacity
print((rss_kib() - before) * 1024)
"""


def test_a_full_ring_is_resident_as_the_formula_says():
    # A fresh process: freed memory of earlier tests cannot be reused for the ring.
    capacity = 1 << 18  # 8 MiB
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT_PROBE, str(capacity)],
        capture_output=True,
        text=True,
        check=True,
    )
    grown = int(out.stdout)
    # Untouched until used (malloc/calloc), resident once full: about the formula.
    assert 0.8 * tombstone_bytes(capacity) <= grown <= 1.5 * tombstone_bytes(capacity)


def test_default_capacity_costs_32_mib():
    assert tombstone_bytes(1 << 20) == 32 * (1 << 20)


def test_rule_is_rate_times_window_with_headroom():
    sizing = recommend(20_000, 60.0, headroom=2.0)
    assert sizing.minimum == 1_200_000
    assert sizing.recommended == 2_400_000
    assert sizing.bytes == tombstone_bytes(2_400_000)
    assert recommend(0.5, 1.0).minimum == 1  # never a zero-capacity ring
    with pytest.raises(ValueError):
        recommend(-1, 60)


def test_sizing_command_prints_capacity_memory_and_setting():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rollout_sessions.cli",
            "tombstone-sizing",
            "--delete-rate",
            "20000",
            "--retry-window",
            "60",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "recommended capacity: 2,400,000" in out
    assert "ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY=2400000" in out
    assert "MiB" in out
    assert "too small" in out  # the 1M default cannot hold 1.2M deletes in 60 s
