"""The tombstone sizing rule and its command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rollout_sessions.registry import Registry, tombstone_bytes
from rollout_sessions.sizing import recommend


@pytest.mark.parametrize("capacity", [1, 10_000, 1 << 20, 1_000_003])
def test_formula_matches_what_the_registry_allocates(capacity):
    assert Registry(shards=1, tombstone_capacity=capacity).stats()["tombstone_bytes"] == (
        tombstone_bytes(capacity)
    )


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
