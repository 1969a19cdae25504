"""The ``rollout-sessions`` command.

Subcommands:

- ``serve``: the session server (BlackSheep on granian, uvloop).
- ``echo-backend``: the echo inference backend alone (``rollout_sessions.echo``).
- ``demo``: a simulated rollout against a server (``rollout_sessions.demo``).
- ``tombstone-sizing``: the recommended tombstone capacity (``rollout_sessions.sizing``).

The last three belong to their modules: everything after the subcommand is
passed to that module's ``main(argv)``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from rollout_sessions import __version__
from rollout_sessions.config import Settings, SettingsError, add_arguments, load_settings

log = logging.getLogger("rollout_sessions")

# In-flight requests get this long to finish after SIGTERM/SIGINT.
GRACEFUL_SHUTDOWN_S = 30.0
# How long `serve` waits for its port to become free before giving up.
PORT_WAIT_S = 2.0

# subcommand -> (module, one-line help); imported only when used.
DELEGATED = {
    "echo-backend": ("rollout_sessions.echo", "run the echo inference backend alone"),
    "demo": ("rollout_sessions.demo", "drive a simulated rollout and print a summary"),
    "tombstone-sizing": (
        "rollout_sessions.sizing",
        "recommend a tombstone capacity for a delete rate and retry window",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout-sessions",
        description="Session server for agentic RL rollouts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve = sub.add_parser(
        "serve",
        help="run the session server",
        description="Run the session server (BlackSheep on granian and uvloop, one worker "
        "process). Every setting comes from its environment variable or its flag; the "
        "flag wins. With no upstream, an embedded echo backend is started and used.",
    )
    add_arguments(serve)
    for name, (_module, help_text) in DELEGATED.items():
        # Their own parsers live in their modules; listed here for --help only.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return _delegate(args_list[0], args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "serve":
        try:
            settings = load_settings(args)
        except SettingsError as exc:
            print(f"rollout-sessions serve: error: invalid setting: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits
    return 2


def _delegate(command: str, argv: list[str]) -> int:
    module = importlib.import_module(DELEGATED[command][0])
    result = module.main(argv)
    return int(result or 0)


# --- serve -------------------------------------------------------------------


def log_config(level: str) -> dict[str, Any]:
    """One logging setup for granian's and our loggers, in both processes."""
    from granian.log import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    numeric = "DEBUG" if level == "trace" else level.upper()
    for name in ("rollout_sessions", "blacksheep"):
        config["loggers"][name] = {"handlers": ["console"], "level": numeric, "propagate": False}
    return config


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a graceful stop.

    granian (Rust HTTP/1.1, measured faster than uvicorn + httptools: see
    benchmarks/RESULTS.md, "ASGI server choice") runs the BlackSheep app in one
    worker process on uvloop; this process supervises it. On SIGTERM/SIGINT
    granian stops accepting, lets in-flight requests finish (at most
    GRACEFUL_SHUTDOWN_S), runs the app's shutdown, and exits 0.
    """
    import logging.config

    from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes
    from granian.log import LogLevels
    from granian.server import Server

    from rollout_sessions.config import settings_to_json, unknown_env_vars
    from rollout_sessions.server import app_from_spec

    logging.config.dictConfig(log_config(settings.log_level))
    # A predecessor may still be closing its socket: allow it a moment.
    deadline = time.monotonic() + PORT_WAIT_S
    while True:
        try:
            _check_port_free(settings.host, settings.port)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
                return 1
            time.sleep(0.1)
    spec: dict[str, Any] = {
        "settings": settings_to_json(settings),
        "echo_port": None,
        "supervisor_pid": os.getpid(),
    }
    if settings.upstream is None:
        # The worker starts the echo backend on this port; say so first.
        spec["echo_port"] = port = _free_loopback_port()
        log.warning(
            "no upstream configured: using embedded echo backend at http://127.0.0.1:%d", port
        )
    for name in unknown_env_vars():
        log.warning("ignoring unknown setting %s (see rollout-sessions serve --help)", name)

    level = "debug" if settings.log_level == "trace" else settings.log_level
    server = Server(
        json.dumps(spec),  # the "target": handed to app_from_spec in the worker
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=1,
        runtime_threads=1,
        runtime_mode=RuntimeModes.st,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        backlog=4096,
        # Requests in flight per worker before granian queues them: thousands
        # of concurrent chat turns must not queue behind each other.
        backpressure=16384,
        log_enabled=True,
        log_level=LogLevels(level),
        log_dictconfig=log_config(settings.log_level),
        log_access=False,  # a log line per request would cost more than the request
        workers_kill_timeout=int(GRACEFUL_SHUTDOWN_S),
    )
    try:
        # app_from_spec(spec) runs in the worker; imported here so a forked
        # worker starts with the modules loaded (and it pickles by reference).
        server.serve(target_loader=app_from_spec, wrap_loader=True)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    log.info("stopped")
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Raise OSError if something already listens there.

    granian binds with SO_REUSEPORT, so a second server on a taken port would
    start and silently share the traffic. A probe bind without it fails
    instead (SO_REUSEADDR only lets it past TIME_WAIT leftovers).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
