"""The `rollout-sessions` command: help, invalid settings, flag-over-env, subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rollout_sessions.config import SPECS
from rollout_sessions.testing.processes import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [sys.executable, "-m", "rollout_sessions.cli", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=ROOT,
        timeout=timeout,
    )


def test_serve_help_documents_every_setting() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # undo argparse line wrapping
    for spec in SPECS:
        assert spec.flag in text
        assert spec.env in text
    for default in [
        "(default: 127.0.0.1;",
        "(default: 8000;",
        "(default: 64;",
        "(default: 1048576;",
    ]:
        assert default in text
    for default in ["(default: 60.0;", "(default: 7200.0;", "(default: 600.0;", "(default: tool;"]:
        assert default in text
    assert "(default: 67108864;" in text and "(default: info;" in text
    assert "(default: unset;" in text  # upstream


def test_top_level_help_lists_subcommands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ["serve", "echo-backend", "demo", "tombstone-sizing"]:
        assert name in out.stdout


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"ROLLOUT_SESSIONS_SHARDS": "x"}, [], "ROLLOUT_SESSIONS_SHARDS: must be an integer"),
        ({"ROLLOUT_SESSIONS_PORT": "http"}, [], "ROLLOUT_SESSIONS_PORT"),
        ({"ROLLOUT_SESSIONS_UPSTREAM": "nohost"}, [], "ROLLOUT_SESSIONS_UPSTREAM"),
        ({"ROLLOUT_SESSIONS_SESSION_TTL_S": "-1"}, [], "ROLLOUT_SESSIONS_SESSION_TTL_S"),
        ({}, ["--tombstone-capacity", "0"], "ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY"),
        ({}, ["--max-body-bytes", "lots"], "--max-body-bytes"),
    ],
)
def test_invalid_setting_stops_startup(env: dict, args: list, needle: str) -> None:
    out = run_cli("serve", *args, env=env)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Uvicorn running" not in out.stderr


def test_port_flag_wins_over_env(server_factory) -> None:
    env_port, flag_port = free_port(), free_port()
    srv = server_factory(
        "--port", str(flag_port), env={"ROLLOUT_SESSIONS_PORT": str(env_port)}, port=flag_port
    )
    assert srv.get("/health").status_code == 200
    assert f"127.0.0.1:{flag_port}" in srv.log()


def test_env_settings_apply_and_flag_wins(server_factory) -> None:
    env = {"ROLLOUT_SESSIONS_MAX_BODY_BYTES": "16", "ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY": "7"}
    from_env = server_factory(env=env)
    body = b'{"session_id": "abcdefghijklmnop"}'
    assert from_env.post("/sessions", data=body).status_code == 413
    assert "rollout_sessions_tombstone_capacity 7.0" in from_env.get("/metrics").text
    from_flag = server_factory("--max-body-bytes", "4096", env=env)
    assert from_flag.post("/sessions", data=body).status_code == 200
    assert "rollout_sessions_tombstone_capacity 7.0" in from_flag.get("/metrics").text


def test_unknown_env_var_is_warned(server_factory) -> None:
    srv = server_factory(env={"ROLLOUT_SESSIONS_SHARD": "4"})
    assert "ignoring unknown setting ROLLOUT_SESSIONS_SHARD" in srv.log()


def test_port_in_use_exits_nonzero(server) -> None:
    out = run_cli("serve", "--port", str(server.port), "--upstream", "http://127.0.0.1:9")
    assert out.returncode != 0


def test_echo_backend_help() -> None:
    out = run_cli("echo-backend", "--help")
    assert out.returncode == 0
    assert "--port" in out.stdout
