"""The soak's flatness check: a leak is a trend, jitter and restart warm-ups are not."""

from __future__ import annotations

import random

from rollout_sessions.testing import soak


def series(duration: float, level, jitter: float = 0.02) -> list[dict[str, float]]:
    rnd = random.Random(7)
    out = []
    t = 0.0
    while t < duration:
        out.append({"t": t, "rss": level(t) * (1 + rnd.uniform(-jitter, jitter))})
        t += soak.SAMPLE_EVERY_S
    return out


def test_a_level_with_jitter_is_flat():
    res = soak.flatness(series(60, lambda t: 100.0), [], 60, "rss")
    assert res["ok"] and abs(res["drift"]) < 0.01


def test_a_leak_of_eight_percent_fails_the_default_band_and_passes_a_wider_one():
    leak = series(60, lambda t: 100.0 + 0.16 * t)  # +8% over the 48-s window
    assert not soak.flatness(leak, [], 60, "rss")["ok"]
    assert soak.flatness(leak, [], 60, "rss", band=0.1)["ok"]


def test_the_seconds_after_a_restart_are_left_out():
    restarts = [{"t": 30.0, "down_s": 0.4}]

    def level(t: float) -> float:  # a restart's warm-up: low, then back to the level
        return 60.0 if 30.0 <= t < 30.0 + soak.RESTART_WARMUP_S else 100.0

    res = soak.flatness(series(60, level), restarts, 60, "rss")
    assert res["ok"] and res["min"] > 90
