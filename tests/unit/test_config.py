"""Settings: env vars, flags (flag wins), validation messages naming the variable."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from rollout_sessions.config import (
    SPECS,
    Settings,
    SettingsError,
    add_arguments,
    load_settings,
    unknown_env_vars,
)


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    s = load_settings(parse_flags(), environ={})
    assert s == Settings()
    assert s.host == "127.0.0.1" and s.port == 8000 and s.upstream is None
    assert s.shards == 64 and s.tombstone_capacity == 1048576
    assert s.retry_window_s == 60.0 and s.session_ttl_s == 7200.0
    assert s.upstream_timeout_s == 600.0 and s.max_body_bytes == 64 * 1024 * 1024
    assert s.allowed_append_roles == ("tool",) and s.log_level == "info"


def test_settings_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_every_field_has_env_and_flag() -> None:
    names = [f.name for f in dataclasses.fields(Settings)]
    assert [spec.field for spec in SPECS] == names
    for spec in SPECS:
        assert spec.env == "ROLLOUT_SESSIONS_" + spec.field.upper()
        assert spec.flag == "--" + spec.field.replace("_", "-")


ENV = {
    "ROLLOUT_SESSIONS_HOST": "0.0.0.0",
    "ROLLOUT_SESSIONS_PORT": "9000",
    "ROLLOUT_SESSIONS_UPSTREAM": "http://backend:30000/",
    "ROLLOUT_SESSIONS_SHARDS": "8",
    "ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY": "10000",
    "ROLLOUT_SESSIONS_RETRY_WINDOW_S": "120",
    "ROLLOUT_SESSIONS_SESSION_TTL_S": "30.5",
    "ROLLOUT_SESSIONS_UPSTREAM_TIMEOUT_S": "5",
    "ROLLOUT_SESSIONS_MAX_BODY_BYTES": "2048",
    "ROLLOUT_SESSIONS_ALLOWED_APPEND_ROLES": "tool, user,tool",
    "ROLLOUT_SESSIONS_LOG_LEVEL": "DEBUG",
}


def test_env() -> None:
    s = load_settings(parse_flags(), environ=ENV)
    assert s == Settings(
        host="0.0.0.0",
        port=9000,
        upstream="http://backend:30000",
        shards=8,
        tombstone_capacity=10000,
        retry_window_s=120.0,
        session_ttl_s=30.5,
        upstream_timeout_s=5.0,
        max_body_bytes=2048,
        allowed_append_roles=("tool", "user"),
        log_level="debug",
    )


def test_flag_wins_over_env() -> None:
    flags = parse_flags(
        "--host",
        "127.0.0.2",
        "--port",
        "9001",
        "--upstream",
        "https://other",
        "--shards",
        "16",
        "--tombstone-capacity",
        "5",
        "--retry-window-s",
        "1",
        "--session-ttl-s",
        "2",
        "--upstream-timeout-s",
        "3",
        "--max-body-bytes",
        "4",
        "--allowed-append-roles",
        "user",
        "--log-level",
        "warning",
    )
    s = load_settings(flags, environ=ENV)
    assert s == Settings(
        host="127.0.0.2",
        port=9001,
        upstream="https://other",
        shards=16,
        tombstone_capacity=5,
        retry_window_s=1.0,
        session_ttl_s=2.0,
        upstream_timeout_s=3.0,
        max_body_bytes=4,
        allowed_append_roles=("user",),
        log_level="warning",
    )


def test_partial_flags_keep_env_for_the_rest() -> None:
    s = load_settings(parse_flags("--shards", "2"), environ=ENV)
    assert s.shards == 2 and s.port == 9000 and s.max_body_bytes == 2048


def test_empty_env_counts_as_unset() -> None:
    env = {spec.env: "" for spec in SPECS}
    assert load_settings(parse_flags(), environ=env) == Settings()


def test_mapping_flags() -> None:
    s = load_settings({"port": 1234, "allowed_append_roles": ("tool", "user")}, environ={})
    assert s.port == 1234 and s.allowed_append_roles == ("tool", "user")


INVALID = [
    ("HOST", " "),
    ("HOST", "a b"),
    ("PORT", "x"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "80.5"),
    ("UPSTREAM", "localhost:8000"),
    ("UPSTREAM", "ftp://x"),
    ("UPSTREAM", "http://"),
    ("UPSTREAM", "http://x:99999"),
    ("UPSTREAM", "http://x/?q=1"),
    ("SHARDS", "x"),
    ("SHARDS", "0"),
    ("SHARDS", "-3"),
    ("SHARDS", "70000"),
    ("TOMBSTONE_CAPACITY", "0"),
    ("TOMBSTONE_CAPACITY", "1e6"),
    ("TOMBSTONE_CAPACITY", str(2**31)),
    ("RETRY_WINDOW_S", "-1"),
    ("RETRY_WINDOW_S", "soon"),
    ("SESSION_TTL_S", "0"),
    ("SESSION_TTL_S", "inf"),
    ("SESSION_TTL_S", "nan"),
    ("UPSTREAM_TIMEOUT_S", "-5"),
    ("MAX_BODY_BYTES", "0"),
    ("MAX_BODY_BYTES", "64MB"),
    ("ALLOWED_APPEND_ROLES", "tool,,user"),
    ("ALLOWED_APPEND_ROLES", "to ol"),
    ("LOG_LEVEL", "loud"),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_env_names_the_variable(name: str, value: str) -> None:
    var = "ROLLOUT_SESSIONS_" + name
    with pytest.raises(SettingsError) as info:
        load_settings(parse_flags(), environ={var: value})
    message = str(info.value)
    assert message.startswith(var + ": ")
    assert repr(value) in message


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_flag_names_flag_and_variable(name: str, value: str) -> None:
    flag = "--" + name.lower().replace("_", "-")
    with pytest.raises(SettingsError) as info:
        load_settings(parse_flags(f"{flag}={value}"), environ={})
    message = str(info.value)
    assert message.startswith(f"{flag} (ROLLOUT_SESSIONS_{name}): ")


def test_invalid_env_ignored_when_flag_given() -> None:
    s = load_settings(parse_flags("--shards", "3"), environ={"ROLLOUT_SESSIONS_SHARDS": "x"})
    assert s.shards == 3


def test_messages_are_specific() -> None:
    with pytest.raises(SettingsError, match=r"^ROLLOUT_SESSIONS_SHARDS: must be an integer"):
        load_settings(parse_flags(), environ={"ROLLOUT_SESSIONS_SHARDS": "x"})
    with pytest.raises(SettingsError, match=r"http:// or https:// URL"):
        load_settings(parse_flags(), environ={"ROLLOUT_SESSIONS_UPSTREAM": "backend:1"})


def test_roles_empty_flag_means_none() -> None:
    s = load_settings(parse_flags("--allowed-append-roles="), environ={})
    assert s.allowed_append_roles == ()


def test_unknown_env_vars() -> None:
    env = {"ROLLOUT_SESSIONS_SHARD": "3", "ROLLOUT_SESSIONS_PORT": "1", "OTHER": "x"}
    assert unknown_env_vars(env) == ["ROLLOUT_SESSIONS_SHARD"]
