"""The ``rollout-sessions`` command.

Subcommands:

- ``serve``: the session server (``rollout_sessions.web.server``).
- ``echo-backend``: the echo inference backend alone (``rollout_sessions.echo.cli``).
- ``demo``: a simulated rollout against a server (``rollout_sessions.demo``).
- ``tombstone-sizing``: the recommended tombstone capacity (``rollout_sessions.sizing``).
- ``cluster``: N instances behind HAProxy on one URL (``rollout_sessions.cluster.supervisor``).
- ``cluster-config``: the HAProxy configuration for instances on several hosts.

All but ``serve`` belong to their modules: everything after the subcommand is
passed to that module's entry point (``main(argv)`` unless named).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rollout_sessions import __version__
from rollout_sessions.config import SettingsError, add_arguments, load_settings

# subcommand -> ("module[:function]", one-line help); imported only when used.
DELEGATED = {
    "echo-backend": ("rollout_sessions.echo.cli", "run the echo inference backend alone"),
    "demo": ("rollout_sessions.demo", "drive a simulated rollout and print a summary"),
    "tombstone-sizing": (
        "rollout_sessions.sizing",
        "recommend a tombstone capacity for a delete rate and retry window",
    ),
    "cluster": (
        "rollout_sessions.cluster.supervisor:cluster_main",
        "run N instances behind HAProxy on one URL (exact session affinity)",
    ),
    "cluster-config": (
        "rollout_sessions.cluster.supervisor:config_main",
        "print the HAProxy configuration for instances on several hosts",
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
        description="Run the session server (the BlackSheep app on uvicorn and uvloop, "
        "one process). "
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
        from rollout_sessions.web.server import serve

        return serve(settings)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits
    return 2


def _delegate(command: str, argv: list[str]) -> int:
    module_name, _, function = DELEGATED[command][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    result = entry(argv)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
