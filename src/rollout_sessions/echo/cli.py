"""``rollout-sessions echo-backend``: the echo backend alone, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop

from rollout_sessions.echo.backend import start_echo_backend


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rollout-sessions echo-backend",
        description="Deterministic echo inference backend (SGLang-style chat answers).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port, 0 for any (default 8001)")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before every answer (default 0)"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    backend = await start_echo_backend(args.host, args.port, args.latency_ms / 1000.0)
    print(f"echo backend listening on {backend.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``rollout-sessions echo-backend [--host H] [--port P] [--latency-ms MS]``."""
    uvloop.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
