"""The demo end to end: a real server subprocess, real HTTP, the summary numbers."""

from __future__ import annotations

import json
import sys

import pytest

from rollout_sessions import demo
from rollout_sessions.testing.processes import ManagedProcess, free_port, start_echo


def _tally(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_demo_small_rollout_has_no_resurrection(capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo.main(
        ["--sessions", "200", "--concurrency", "16", "--turns", "2", "--no-progress", "--json"]
    )
    out = capsys.readouterr().out
    t = _tally(out)
    assert rc == 0, out
    assert t["sessions"] == 200
    assert t["by_kind"] == {"minted": 67, "by_id": 67, "auto": 66}
    assert t["turns"] == 400
    assert t["deletes"] == 200
    assert t["retries"] == 400  # one stale chat and one stale GET per deleted id
    assert t["retries_refused"] == 400
    assert t["resurrections"] == 0
    assert t["errors"] == 0
    for label in ("sessions", "turns", "deletes", "retries refused", "resurrections", "throughput"):
        assert label in out


def test_demo_counts_resurrections_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """Against the production-style reference with no tombstone room, retries come back."""
    ref_port = free_port()
    with start_echo() as echo:
        ref = [sys.executable, "-m", "rollout_sessions.testing.reference_server"]
        ref += ["--port", str(ref_port)]
        ref += ["--upstream", echo.url, "--tombstone-capacity", "0"]
        with ManagedProcess(ref, ref_port) as reference:
            reference.wait_healthy()
            rc = demo.main(
                ["--url", reference.url, "--sessions", "20", "--concurrency", "4"]
                + ["--turns", "1", "--ids", "minted", "--no-progress", "--json"]
            )
    t = _tally(capsys.readouterr().out)
    assert rc == 1
    assert t["sessions"] == 20 and t["turns"] == 20
    assert t["resurrections"] == 40  # the stale chat auto-creates a ghost, the GET reads it
    assert t["retries_refused"] == 0


def test_demo_refuses_a_non_loopback_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--url", "http://192.0.2.1:8000", "--sessions", "1", "--no-progress"]) == 2
    assert "non-loopback" in capsys.readouterr().err


def test_demo_anthropic_protocol_drives_a_tool_using_agent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = demo.main(
        ["--protocol", "anthropic", "--sessions", "60", "--concurrency", "8", "--turns", "3"]
        + ["--no-progress", "--json"]
    )
    out = capsys.readouterr().out
    t = _tally(out)
    assert rc == 0, out
    assert t["sessions"] == 60 and t["turns"] == 180
    assert t["tool_calls"] == 120  # a tool_use answered on every turn but the last
    assert t["retries_refused"] == 120 and t["resurrections"] == 0 and t["errors"] == 0
