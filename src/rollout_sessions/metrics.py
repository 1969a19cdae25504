"""Prometheus metrics, one ``CollectorRegistry`` per app.

Registry-derived numbers (live sessions, creates, deletes, tombstones,
horizon, ...) are read from ``registry.stats()`` when /metrics is scraped, by
a custom collector: the registry already counts them, so nothing is counted
twice and the request path pays nothing for them.

Request latency is kept in plain per-route bucket arrays (one ``bisect`` and
two additions per request, no lock: every observation happens on the event
loop thread) and exposed as Prometheus histograms at scrape time.

Hooks for the chat code (all cheap, event-loop thread only)::

    state.metrics.chat_turns.inc("recorded")        # or "stale", "closing", ...
    state.metrics.upstream_errors.inc("timeout")    # or "transport", "malformed", ...
    state.metrics.upstream_cancelled += n            # calls cancelled by a DELETE
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

PREFIX = "rollout_sessions_"

# Lifecycle routes answer in tens of microseconds; chat routes wait for the
# upstream, up to the upstream timeout. One set of buckets covers both.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class RouteLatency:
    """Histogram state of one (method, route) pair."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last slot is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class LabeledCounter:
    """A counter family with one label, incremented from the event loop."""

    __slots__ = ("name", "help", "label", "values")

    def __init__(self, name: str, help: str, label: str) -> None:
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, int] = {}

    def inc(self, value: str, amount: int = 1) -> None:
        self.values[value] = self.values.get(value, 0) + amount

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.help, labels=[self.label])
        for value, count in sorted(self.values.items()):
            fam.add_metric([value], count)
        return fam


class _StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        stats_fn = m.stats_fn
        if stats_fn is not None:
            yield from _registry_families(stats_fn(), m.retry_window_s)
        yield _latency_family(m.latency)
        yield m.responses.family()
        yield m.chat_turns.family()
        yield m.upstream_errors.family()
        yield _counter(
            "upstream_cancelled",
            "Upstream calls cancelled (connection closed) because DELETE removed their "
            "session while they were in flight (CANCEL_ON_DELETE).",
            m.upstream_cancelled,
        )
        yield m.sampling_overrides.family()
        yield m.sampling_overrides_replaced.family()


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, help, value=value)


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, help, value=value)


def _registry_families(stats: dict[str, Any], retry_window_s: float | None) -> Iterator[Metric]:
    yield _gauge("live_sessions", "Sessions currently live.", stats["live"])
    creates = CounterMetricFamily(
        PREFIX + "session_creates",
        "Sessions created, by kind: minted (POST /sessions), by_id (POST /sessions with "
        "a session_id), auto (first chat turn of a never-seen id).",
        labels=["kind"],
    )
    creates.add_metric(["minted"], stats["minted"])
    creates.add_metric(["by_id"], stats["created_by_id"])
    creates.add_metric(["auto"], stats["auto_creates"])
    yield creates
    yield _counter("session_deletes", "Sessions deleted by DELETE.", stats["deletes"])
    yield _gauge("tombstones", "Deleted foreign ids remembered by the ring.", stats["tombstones"])
    yield _gauge(
        "tombstone_capacity",
        "Ring capacity (ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY).",
        stats["capacity"],
    )
    yield _gauge(
        "tombstone_horizon_seconds",
        "Age of the oldest remembered delete; keep it above the retry window.",
        stats["horizon_s"],
    )
    if retry_window_s is not None:
        yield _gauge(
            "tombstone_retry_window_seconds",
            "Configured retry window (ROLLOUT_SESSIONS_RETRY_WINDOW_S).",
            retry_window_s,
        )
    yield _counter(
        "tombstone_young_overwrites",
        "Tombstones overwritten while younger than the retry window: when this grows, "
        "raise ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY.",
        stats["young_overwrites"],
    )
    yield _counter(
        "deleted_refusals",
        "Requests refused because their id was deleted (stale retries that did not "
        "resurrect a session).",
        stats["deleted_refusals"],
    )
    yield _counter("ttl_evictions", "Sessions evicted after the idle TTL.", stats["ttl_evictions"])


def _latency_family(latency: dict[tuple[str, str], RouteLatency]) -> Metric:
    fam = HistogramMetricFamily(
        PREFIX + "request_duration_seconds",
        "Request handling time by method and route template.",
        labels=["method", "route"],
    )
    bounds = [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for (method, route), obs in sorted(latency.items()):
        running = 0
        buckets = []
        for bound, count in zip(bounds, obs.counts, strict=True):
            running += count
            buckets.append((bound, running))
        fam.add_metric([method, route], buckets, obs.total)
    return fam


class Metrics:
    """All metrics of one app. ``stats_fn`` is ``registry.stats``."""

    def __init__(
        self,
        stats_fn: Callable[[], dict[str, Any]] | None = None,
        retry_window_s: float | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stats_fn = stats_fn
        self.retry_window_s = retry_window_s
        self.latency: dict[tuple[str, str], RouteLatency] = {}
        self.responses = LabeledCounter(
            PREFIX + "error_responses",
            "Error answers (status >= 400) by status code.",
            "status",
        )
        self.chat_turns = LabeledCounter(PREFIX + "chat_turns", "Chat turns by outcome.", "outcome")
        self.upstream_errors = LabeledCounter(
            PREFIX + "upstream_errors", "Failed upstream calls by kind.", "kind"
        )
        self.upstream_cancelled = 0
        self.sampling_overrides = LabeledCounter(
            PREFIX + "sampling_overrides_applied",
            "Turns forwarded with a SAMPLING_OVERRIDES value set, by parameter.",
            "param",
        )
        self.sampling_overrides_replaced = LabeledCounter(
            PREFIX + "sampling_overrides_replaced",
            "Turns whose client sent a different value for an overridden parameter "
            "(replaced by the override), by parameter.",
            "param",
        )
        self.registry.register(_StatsCollector(self))

    def route(self, method: str, template: str) -> RouteLatency:
        """The latency histogram of one route; resolve once, observe per request."""
        key = (method, template)
        obs = self.latency.get(key)
        if obs is None:
            obs = self.latency[key] = RouteLatency()
        return obs

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST
