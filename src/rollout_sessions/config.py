"""Server settings: one typed object, read once at start-up.

Every field has an environment variable ``ROLLOUT_SESSIONS_<FIELD>`` and a
``serve`` flag ``--<field-with-dashes>`` of the same meaning; the flag wins.
An empty environment variable counts as unset. An invalid value raises
``SettingsError`` whose message names the variable (and the flag, if the
value came from one); the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "ROLLOUT_SESSIONS_"

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    upstream: str | None = None
    shards: int = 64
    tombstone_capacity: int = 1048576
    retry_window_s: float = 60.0
    session_ttl_s: float = 7200.0
    upstream_timeout_s: float = 600.0
    max_body_bytes: int = 64 * 1024 * 1024
    allowed_append_roles: tuple[str, ...] = ("tool",)
    log_level: str = "info"
    header_timeout_s: float = 30.0
    keep_alive_s: float = 75.0
    max_upstream_answer_bytes: int = 256 * 1024 * 1024
    api_key: str | None = field(default=None, repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    tokenizer: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tito_model: str = "auto"
    data_dir: str = "./rollout-sessions-data"
    journal: bool = True
    journal_sync: str = "normal"
    journal_max_bytes: int | None = None
    instance_tag: int = 0
    sampling_overrides: dict[str, Any] = field(default_factory=dict)
    upstream_routing_header: str | None = "X-SMG-Routing-Key"
    cancel_on_delete: bool = True
    trajectory: str = "linear"
    message_matcher: str = "strict"
    max_tree_nodes: int = 1024
    sample_picker: str = "drop_retries"


class SettingsError(ValueError):
    """An invalid setting; the message names its variable."""


# --- value parsers: raise ValueError("<what is wrong>") --------------------


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    if hi is None:
        expect = f"an integer >= {lo}"
    else:
        expect = f"an integer between {lo} and {hi}"

    def parse(raw: str) -> int:
        text = raw.strip()
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"must be {expect}, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be {expect}, got {raw!r}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds > 0, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a number of seconds > 0, got {raw!r}")
    return value


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError(f"must be a host name or IP address, got {raw!r}")
    return value


def _upstream(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must be a base URL without query or fragment, got {raw!r}")
    try:
        parts.port  # noqa: B018 - validates the port number
    except ValueError:
        raise ValueError(f"has an invalid port, got {raw!r}") from None
    # The proxy joins paths onto the base: keep one canonical form, no trailing slash.
    return value.rstrip("/")


def _roles(raw: str) -> tuple[str, ...]:
    roles = tuple(part.strip() for part in raw.split(","))
    if not raw.strip():
        return ()
    if any(not role or not role.replace("_", "").isalnum() for role in roles):
        raise ValueError(f"must be a comma-separated list of role names, got {raw!r}")
    # Keep order, drop duplicates.
    return tuple(dict.fromkeys(roles))


def _secret(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be printable characters without spaces")
    return value


def _optional(raw: str) -> str | None:
    return raw.strip() or None


def _file(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not os.path.isfile(value):
        raise ValueError(f"must be a readable file, got {raw!r}")
    return value


def _json_object(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"must be a JSON object, got {raw!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {raw!r}")
    return value


def _sampling_overrides(raw: str) -> dict[str, Any]:
    from rollout_sessions.upstream.controls import parse_overrides

    return parse_overrides(raw)


def _routing_header(raw: str) -> str | None:
    from rollout_sessions.upstream.controls import parse_routing_header

    return parse_routing_header(raw)


def _tito_model(raw: str) -> str:
    from rollout_sessions.tito import AUTO, RULES

    value = raw.strip().lower()
    if value != AUTO and value not in RULES:
        raise ValueError(f"must be one of {AUTO}, {', '.join(RULES)}, got {raw!r}")
    return value


def _on_off(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"must be on or off, got {raw!r}")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _directory(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must be a directory path")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Spec:
    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SPECS: tuple[_Spec, ...] = (
    _Spec("host", _host, "HOST", "interface to listen on"),
    _Spec("port", _int_in(1, 65535), "PORT", "TCP port to listen on"),
    _Spec(
        "upstream",
        _upstream,
        "URL",
        "base URL of the OpenAI-compatible inference backend (SGLang, vLLM, a router); "
        "unset: an embedded echo backend is started and used",
    ),
    _Spec(
        "shards",
        _int_in(1, 65536),
        "N",
        "number of registry shards, each with its own table and lock",
    ),
    _Spec(
        "tombstone_capacity",
        _int_in(1, 2**31 - 1),
        "N",
        "how many deleted foreign ids (created by id or auto-created) are remembered; "
        "about 32 bytes per entry (24 preallocated in the ring, 8 in its index), "
        "so the default costs ~32 MiB. "
        "Self-minted ids need no tombstone. Raise it when the young-overwrite warning "
        "or rollout_sessions_tombstone_young_overwrites_total grows "
        "(rule: peak delete rate x retry window)",
    ),
    _Spec(
        "retry_window_s",
        _positive_float,
        "SECONDS",
        "how long after a delete a stale retry is still expected; a tombstone overwritten "
        "younger than this is counted and warned about",
    ),
    _Spec(
        "session_ttl_s",
        _positive_float,
        "SECONDS",
        "idle time after which a session is evicted (not tombstoned)",
    ),
    _Spec(
        "upstream_timeout_s",
        _positive_float,
        "SECONDS",
        "timeout of one upstream call (answers 504 when exceeded)",
    ),
    _Spec(
        "max_body_bytes",
        _int_in(1),
        "BYTES",
        "largest accepted request body (answers 413 beyond, never buffered past it)",
    ),
    _Spec(
        "allowed_append_roles",
        _roles,
        "ROLES",
        "comma-separated roles a client may append after the last assistant message",
    ),
    _Spec("log_level", _log_level, "LEVEL", f"log level: {', '.join(LOG_LEVELS)}"),
    _Spec(
        "header_timeout_s",
        _positive_float,
        "SECONDS",
        "a connection whose request head is not complete this long after it opened (or "
        "after its first byte) is closed; a request body must arrive within it too (408)",
    ),
    _Spec(
        "keep_alive_s",
        _positive_float,
        "SECONDS",
        "a keep-alive connection idle this long after its last answer is closed",
    ),
    _Spec(
        "max_upstream_answer_bytes",
        _int_in(1),
        "BYTES",
        "largest accepted upstream answer (502 beyond; its connection is dropped)",
    ),
    _Spec(
        "api_key",
        _secret,
        "KEY",
        "when set, every route but /health needs 'Authorization: Bearer <KEY>' or "
        "'x-api-key: <KEY>' (else 401); "
        "never forwarded upstream",
    ),
    _Spec(
        "upstream_api_key",
        _secret,
        "KEY",
        "sent upstream as 'Authorization: Bearer <KEY>' on every upstream call",
    ),
    _Spec(
        "tokenizer",
        _optional,
        "NAME_OR_DIR",
        "a Hugging Face tokenizer (directory or name, loaded with AutoTokenizer): turns on "
        "token-in, token-out (the server builds every prompt's input_ids); unset: TITO off",
    ),
    _Spec("chat_template", _file, "FILE", "a jinja file that replaces the tokenizer's template"),
    _Spec(
        "chat_template_kwargs",
        _json_object,
        "JSON",
        "a JSON object passed to every chat template render",
    ),
    _Spec(
        "tito_model",
        _tito_model,
        "RULE",
        "the model family, for where a stored checkpoint meets the appended tokens: auto "
        "(default: chosen from the tokenizer's name, special tokens or template, and logged), "
        "default (concatenate), qwen3, qwen35, qwennext, nemotron3 (newline after a final "
        "<|im_end|>), glm47, glm45, glm5 (drop a final <|observation|> or <|user|>), kimi25, "
        "kimi26, minimax_m25, minimax_m27 (newline after a final [e~[), deepseekv32, "
        "deepseekv4 (the template is an encoder written as code), inkling",
    ),
    _Spec(
        "data_dir",
        _directory,
        "DIR",
        "where the journal lives (an SQLite database): sessions, turns and deletes survive "
        "a restart, kill -9 included",
    ),
    _Spec(
        "journal",
        _on_off,
        "on|off",
        "off (or --no-journal): memory only, nothing is written to disk",
    ),
    _Spec(
        "journal_sync",
        _choice("normal", "full"),
        "normal|full",
        "normal: an answered turn survives a killed process (a power loss may lose the last "
        "ones); full: it survives a power loss too (an fsync per commit)",
    ),
    _Spec(
        "journal_max_bytes",
        _int_in(1 << 20),
        "BYTES",
        "cap on the journal's size; a write past it is answered 507 (default: the disk)",
    ),
    _Spec(
        "instance_tag",
        _int_in(0, 4095),
        "K",
        "this instance's tag (0-4095), the first 3 hex digits of the ids it mints; "
        "a cluster routes minted ids back by it",
    ),
    _Spec(
        "sampling_overrides",
        _sampling_overrides,
        "JSON",
        "a JSON object set on every forwarded chat turn over the client's values, e.g. "
        '\'{"temperature": 1.0, "top_p": 1.0}\' keeps rollouts on-policy; the record shows '
        "what was forwarded",
    ),
    _Spec(
        "upstream_routing_header",
        _routing_header,
        "NAME|none",
        "header carrying the session id on every upstream call made for a session (a "
        "routing gateway keeps the session on one worker); none: not sent",
    ),
    _Spec(
        "cancel_on_delete",
        _on_off,
        "on|off",
        "on: DELETE closes the upstream connections of the session's turns in flight (the "
        "backend aborts them) and they answer 404; off: they finish, unrecorded",
    ),
    _Spec(
        "trajectory",
        _choice("linear", "tree"),
        "linear|tree",
        "linear: one trajectory per session (extend, or retry one step back); tree: "
        "always-branch, a forest of nodes (compaction, deep retries, sub-agents, n > 1)",
    ),
    _Spec(
        "message_matcher",
        _choice("strict", "loose_tool_call", "role_content_only"),
        "MATCHER",
        "tree mode: how a request's messages are matched against a node's path: strict, "
        "loose_tool_call (tool-call arguments compared as parsed JSON), role_content_only",
    ),
    _Spec(
        "max_tree_nodes",
        _int_in(1, 1 << 20),
        "N",
        "tree mode: nodes per session; a turn past it is refused (409) before any upstream call",
    ),
    _Spec(
        "sample_picker",
        _choice("drop_retries", "all", "active"),
        "PICKER",
        "tree mode: which leaves the samples export keeps: drop_retries (superseded "
        "attempts dropped), all, active (the active path only)",
    ),
)

_DEFAULTS = Settings()
assert [s.field for s in SPECS] == [f.name for f in fields(Settings)]


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(value) if value else "(empty)"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting. Flags default to None so we can tell 'not given'."""
    group = parser.add_argument_group(
        "settings",
        "Each flag overrides its environment variable; an empty variable counts as unset.",
    )
    for spec in SPECS:
        default = _show_default(getattr(_DEFAULTS, spec.field))
        group.add_argument(
            spec.flag,
            dest=spec.field,
            metavar=spec.metavar,
            default=None,
            help=f"{spec.help} (default: {default}; env {spec.env})",
        )
    group.add_argument(
        "--no-journal",
        dest="journal",
        action="store_const",
        const="off",
        help="the same as --journal off",
    )


def load_settings(
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from env vars and flags (flag wins). Raises SettingsError."""
    env = os.environ if environ is None else environ
    if isinstance(flags, argparse.Namespace):
        given: Mapping[str, Any] = vars(flags)
    else:
        given = flags or {}
    values: dict[str, Any] = {}
    for spec in SPECS:
        raw = given.get(spec.field)
        if raw is not None:
            source = f"{spec.flag} ({spec.env})"
        else:
            raw = env.get(spec.env)
            source = spec.env
            if raw is None or raw == "":
                continue
        if not isinstance(raw, str):
            # Programmatic callers may pass typed values; validate their text form.
            if isinstance(raw, dict):
                raw = json.dumps(raw)
            elif isinstance(raw, bool):
                raw = "on" if raw else "off"
            else:
                raw = ",".join(raw) if isinstance(raw, (tuple, list)) else str(raw)
        try:
            values[spec.field] = spec.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
    return Settings(**values)


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """ROLLOUT_SESSIONS_* variables that match no setting (likely typos)."""
    env = os.environ if environ is None else environ
    known = {spec.env for spec in SPECS}
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
