"""Tombstone sizing: how many deleted ids must the ring remember?

The rule: a deleted foreign id must stay in the ring for as long as stale
retries for it can still arrive, the retry window W. With a peak delete rate
R of foreign ids (client-supplied ids, or ids minted before a restart), the
ring sees R * W deletes within one window, so

    capacity >= R * W

Self-minted ids never use the ring (the id itself proves it was ours), so
only foreign deletes count. The recommendation adds headroom for bursts: a
rollout step deletes its whole batch at once, so the peak rate is far above
the mean.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rollout_sessions.config import Settings
from rollout_sessions.registry import tombstone_bytes

DEFAULT_HEADROOM = 2.0
MAX_CAPACITY = 0x7FFFFFFF  # the registry's limit


@dataclass(frozen=True, slots=True)
class Sizing:
    minimum: int  # R * W, rounded up
    recommended: int  # minimum * headroom, within the registry's limit
    bytes: int  # memory of the recommended ring

    @property
    def bytes_per_entry(self) -> float:
        return self.bytes / self.recommended


def recommend(
    delete_rate: float, retry_window_s: float, headroom: float = DEFAULT_HEADROOM
) -> Sizing:
    """The capacity for ``delete_rate`` foreign deletes/s and a retry window in seconds."""
    if not (delete_rate >= 0 and retry_window_s >= 0 and headroom >= 1):
        raise ValueError("delete rate and retry window must be >= 0, headroom >= 1")
    minimum = max(1, math.ceil(delete_rate * retry_window_s))
    recommended = min(MAX_CAPACITY, max(minimum, math.ceil(minimum * headroom)))
    return Sizing(minimum, recommended, tombstone_bytes(recommended))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    default = Settings()
    parser = argparse.ArgumentParser(
        prog="rollout-sessions tombstone-sizing",
        description="Recommend ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY for a peak rate of "
        "foreign-id deletes and a retry window (capacity >= rate x window).",
    )
    parser.add_argument(
        "--delete-rate",
        type=float,
        required=True,
        help="peak deletes per second of foreign ids (client-supplied, or minted before "
        "a restart); ids this server minted need no tombstone",
    )
    parser.add_argument(
        "--retry-window",
        type=float,
        default=default.retry_window_s,
        help=f"seconds during which stale retries arrive (default {default.retry_window_s:g})",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help=f"safety factor over rate x window (default {DEFAULT_HEADROOM:g})",
    )
    args = parser.parse_args(argv)
    try:
        sizing = recommend(args.delete_rate, args.retry_window, args.headroom)
    except ValueError as exc:
        parser.error(str(exc))
    current = default.tombstone_capacity
    print(f"rule: capacity >= delete rate x retry window = {sizing.minimum:,}")
    print(f"recommended capacity: {sizing.recommended:,} (headroom {args.headroom:g}x)")
    print(f"memory: {_mib(sizing.bytes)} ({sizing.bytes_per_entry:.1f} bytes per entry)")
    print(
        f"set it with: ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY={sizing.recommended} "
        f"or --tombstone-capacity {sizing.recommended}"
    )
    verdict = "enough" if current >= sizing.recommended else "too small"
    print(f"the default ({current:,}, {_mib(tombstone_bytes(current))}) is {verdict}")
    return 0
