"""The ``rollout-sessions`` command.

Subcommands:

- ``serve``: the session server (BlackSheep on uvloop, ``rollout_sessions.http1``).
- ``echo-backend``: the echo inference backend alone (``rollout_sessions.echo``).
- ``demo``: a simulated rollout against a server (``rollout_sessions.demo``).
- ``tombstone-sizing``: the recommended tombstone capacity (``rollout_sessions.sizing``).

The last three belong to their modules: everything after the subcommand is
passed to that module's ``main(argv)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rollout_sessions import __version__
from rollout_sessions.config import Settings, SettingsError, add_arguments, load_settings

log = logging.getLogger("rollout_sessions")

# In-flight requests get this long to finish after SIGTERM/SIGINT.
GRACEFUL_SHUTDOWN_S = 30.0
# How long `serve` waits for its port to become free before giving up
# (a predecessor may still be closing it).
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
        description="Run the session server (the BlackSheep app on uvloop, one process). "
        "Every setting comes from its environment variable or its flag; the "
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
    """Our and BlackSheep's loggers, one line per record on stderr."""
    numeric = "DEBUG" if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "[%(levelname)s] %(message)s"}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["console"], "level": numeric, "propagate": False}
            for name in ("rollout_sessions", "blacksheep")
        },
    }


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a graceful stop.

    One process, one uvloop event loop: the app is served by our own
    HTTP/1.1 protocol (``rollout_sessions.http1``; chosen over granian and
    uvicorn by measurement, benchmarks/RESULTS.md "HTTP server choice"). On
    SIGTERM/SIGINT it stops accepting, lets requests in flight finish (at most
    GRACEFUL_SHUTDOWN_S), runs the app's shutdown, and exits 0.
    """
    import logging.config

    import uvloop

    from rollout_sessions import http1
    from rollout_sessions.config import unknown_env_vars
    from rollout_sessions.demo import free_port
    from rollout_sessions.server import app_for_serving

    logging.config.dictConfig(log_config(settings.log_level))
    echo_port = None
    if settings.upstream is None:
        # The app starts the echo backend on this port; say so first.
        echo_port = free_port()
        log.warning(
            "no upstream configured: using embedded echo backend at http://127.0.0.1:%d",
            echo_port,
        )
    for name in unknown_env_vars():
        log.warning("ignoring unknown setting %s (see rollout-sessions serve --help)", name)
    app = app_for_serving(settings, echo_port)
    try:
        uvloop.run(
            http1.run(
                app,
                settings.host,
                settings.port,
                max_body_bytes=settings.max_body_bytes,
                graceful_s=GRACEFUL_SHUTDOWN_S,
                bind_wait_s=PORT_WAIT_S,
            )
        )
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
