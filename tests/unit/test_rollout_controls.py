"""Rollout controls in-process: settings parsing, overrides, the in-flight table, the
routing header of ``Upstream.headers``."""

from __future__ import annotations

import asyncio

import pytest

from rollout_sessions.config import Settings, SettingsError, load_settings
from rollout_sessions.metrics import Metrics
from rollout_sessions.upstream.client import HOP_BY_HOP, Upstream
from rollout_sessions.upstream.controls import (
    InFlight,
    Overrides,
    parse_overrides,
    parse_routing_header,
)


def test_defaults() -> None:
    s = load_settings({}, environ={})
    assert s.sampling_overrides == {}
    assert s.upstream_routing_header == "X-SMG-Routing-Key"
    assert s.cancel_on_delete is True
    assert s == Settings()


def test_env_and_flag_flag_wins() -> None:
    env = {
        "ROLLOUT_SESSIONS_SAMPLING_OVERRIDES": '{"temperature": 1.0}',
        "ROLLOUT_SESSIONS_UPSTREAM_ROUTING_HEADER": "none",
        "ROLLOUT_SESSIONS_CANCEL_ON_DELETE": "off",
    }
    s = load_settings({}, environ=env)
    assert s.sampling_overrides == {"temperature": 1.0}
    assert s.upstream_routing_header is None
    assert s.cancel_on_delete is False
    flags = {
        "sampling_overrides": '{"top_p": 0.5}',
        "upstream_routing_header": "X-Route",
        "cancel_on_delete": "on",
    }
    s = load_settings(flags, environ=env)
    assert s.sampling_overrides == {"top_p": 0.5}
    assert s.upstream_routing_header == "X-Route"
    assert s.cancel_on_delete is True


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("SAMPLING_OVERRIDES", "[]", "must be a JSON object"),
        ("SAMPLING_OVERRIDES", "nope", "must be a JSON object"),
        ("SAMPLING_OVERRIDES", '{"stream": true}', "cannot set stream"),
        ("SAMPLING_OVERRIDES", '{"input_ids": [1], "tools": []}', "cannot set input_ids, tools"),
        ("SAMPLING_OVERRIDES", '{"chat_template_kwargs": 1}', "must be a JSON object"),
        ("UPSTREAM_ROUTING_HEADER", "two words", "header name"),
        ("UPSTREAM_ROUTING_HEADER", "Authorization", "sets itself"),
        ("UPSTREAM_ROUTING_HEADER", "transfer-encoding", "sets itself"),
        ("CANCEL_ON_DELETE", "maybe", "on or off"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({}, environ={f"ROLLOUT_SESSIONS_{name}": value})
    assert f"ROLLOUT_SESSIONS_{name}" in str(err.value)
    assert needle in str(err.value)


def test_parsers() -> None:
    assert parse_overrides("  ") == {}
    assert parse_overrides('{"top_k": 20, "min_p": 0.0}') == {"top_k": 20, "min_p": 0.0}
    assert parse_routing_header("NONE") is None
    assert parse_routing_header(" x-smg-routing-key ") == "x-smg-routing-key"


def test_overrides_replace_and_count() -> None:
    metrics = Metrics()
    overrides = Overrides({"temperature": 1.0, "top_p": 1.0}, metrics)
    req = {"messages": [], "temperature": 0.1, "top_p": 1}
    overrides.apply(req)
    assert req == {"messages": [], "temperature": 1.0, "top_p": 1.0}
    overrides.apply({"messages": []})
    assert metrics.sampling_overrides.values == {"temperature": 2, "top_p": 2}
    assert metrics.sampling_overrides_replaced.values == {"temperature": 1}
    text = metrics.render().decode()
    assert 'rollout_sessions_sampling_overrides_applied_total{param="temperature"} 2.0' in text
    assert 'rollout_sessions_sampling_overrides_replaced_total{param="temperature"} 1.0' in text
    assert "rollout_sessions_upstream_cancelled_total 0.0" in text


def test_in_flight_table() -> None:
    async def main() -> None:
        table = InFlight()
        a, b = object(), object()
        started = asyncio.Event()
        release = asyncio.Event()
        outcomes: dict[str, object] = {}

        async def call(name: str, session: object) -> None:
            task = table.enter(session)
            try:
                started.set()
                await release.wait()
                outcomes[name] = table.leave(session, task)
            except asyncio.CancelledError:
                outcomes[name] = ("cancelled", table.leave(session, task))

        tasks = [
            asyncio.create_task(call("a1", a)),
            asyncio.create_task(call("a2", a)),
            asyncio.create_task(call("b1", b)),
        ]
        await asyncio.sleep(0)
        assert len(table) == 2
        assert table.cancel(a) == 2
        assert table.cancel(a) == 0  # forgotten at once: a second DELETE cancels nothing
        release.set()
        await asyncio.gather(*tasks)
        # Cancelled tasks learn it was the DELETE (no longer in the table).
        assert outcomes == {"a1": ("cancelled", False), "a2": ("cancelled", False), "b1": True}
        assert len(table) == 0  # nothing left behind for an idle session

    asyncio.run(main())


def test_routing_header_replaces_the_clients_value_in_any_case() -> None:
    up = Upstream("http://x", timeout_s=1, max_answer_bytes=1, routing_header="X-SMG-Routing-Key")
    client = [("x-smg-routing-key", "spoof"), ("X-SMG-ROUTING-KEY", "spoof2"), ("A", "b")]
    out = up.headers(client, HOP_BY_HOP, "sid-1")
    assert out.getall("X-SMG-Routing-Key") == ["sid-1"]
    assert out["A"] == "b"
    # Not for a session (no id): untouched.
    assert up.headers(client, HOP_BY_HOP).getall("x-smg-routing-key") == ["spoof", "spoof2"]
    off = Upstream("http://x", timeout_s=1, max_answer_bytes=1, routing_header=None)
    assert "x-smg-routing-key" not in off.headers([], HOP_BY_HOP, "sid-1")
