"""``rollout-sessions echo-backend``: the echo backend alone, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from rollout_sessions.echo.backend import start_echo_backend

if TYPE_CHECKING:
    from rollout_sessions.echo.tokenized import TokenizedTemplate


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
    parser.add_argument(
        "--tokenizer",
        help="a Hugging Face tokenizer (directory or name): real token ids from its chat "
        "template instead of the toy template",
    )
    parser.add_argument(
        "--tito-model",
        default="default",
        help="the family's stop-token behaviour: a TITO_MODEL name such as qwen3, glm47, "
        "kimi25, minimax_m25, deepseekv32, inkling, or auto (default: default)",
    )
    parser.add_argument("--chat-template", help="a jinja file replacing the tokenizer's template")
    return parser.parse_args(argv)


def _tokenized(args: argparse.Namespace) -> TokenizedTemplate | None:
    if not args.tokenizer:
        return None
    from rollout_sessions.echo.tokenized import TokenizedTemplate
    from rollout_sessions.tito import Tito

    return TokenizedTemplate(Tito.load(args.tokenizer, args.tito_model, args.chat_template))


async def _serve(args: argparse.Namespace) -> None:
    backend = await start_echo_backend(
        args.host, args.port, args.latency_ms / 1000.0, _tokenized(args)
    )
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
