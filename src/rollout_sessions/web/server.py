"""``rollout-sessions serve``: the app on uvicorn (httptools, uvloop), one process.

uvicorn parses, frames, pipelines in order and applies flow control;
``_uvicorn.guarded_protocol`` adds the head deadline, the head size limit
and the connection cap. On SIGTERM or SIGINT the server stops accepting,
closes idle connections, lets requests in flight finish (at most
``GRACEFUL_SHUTDOWN_S``), runs the app's shutdown and exits 0.
"""

from __future__ import annotations

import gc
import logging
import logging.config
import resource
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from blacksheep import Application

from rollout_sessions.config import Settings, unknown_env_vars
from rollout_sessions.journal.db import JournalError
from rollout_sessions.web._uvicorn import Server, guarded_protocol
from rollout_sessions.web.app import create_app

log = logging.getLogger("rollout_sessions")

GRACEFUL_SHUTDOWN_S = 30
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKLOG = 4096
# File descriptors kept free of client connections: the upstream pool, the
# journal and the logs need them even when clients open all they can.
RESERVED_FDS_MIN = 256

# Young-generation threshold of the cyclic GC in the serving process
# (CPython's default: 700). A young collection promotes whatever is alive
# (every request in flight), and promotions trigger the full collections
# that walk every live session; a higher threshold keeps them rare.
GC_GEN0_THRESHOLD = 10_000


def free_port(host: str = "127.0.0.1", exclude: int | None = None) -> int:
    """A TCP port nobody listens on right now, other than ``exclude`` (a port that is
    about to be bound, so the kernel may well offer it)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port != exclude:
            return port


def log_config(level: str) -> dict[str, Any]:
    """Our loggers at ``level``, uvicorn's at warning, one line per record on stderr."""
    numeric = "DEBUG" if level == "trace" else level.upper()
    quiet = "WARNING" if numeric in ("DEBUG", "INFO") else numeric
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
            "rollout_sessions": {"handlers": ["console"], "level": numeric, "propagate": False},
            "blacksheep": {"handlers": ["console"], "level": numeric, "propagate": False},
            "uvicorn": {"handlers": ["console"], "level": quiet, "propagate": False},
        },
    }


def connection_cap() -> int:
    """Raise the soft file limit to the hard one; the client connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    reserve = max(RESERVED_FDS_MIN, soft // 8)
    return max(16, soft - reserve)


async def settle_gc(app: Application) -> None:
    """Once started: freeze the start-up heap and raise the young-GC threshold.

    The objects of start-up (modules, app, routes, OpenAPI docs) never become
    garbage; frozen, no full collection walks them again. Process-wide, so
    only ``serve`` does this, never ``create_app``.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def stop_handler(server: Server) -> Callable[[int, FrameType | None], None]:
    """Our handler for SIGINT and SIGTERM outside ``server.run``.

    While uvicorn serves, its own handler replaces ours. After a graceful
    stop it puts ours back and delivers the signal again, to us: the stop is
    done, so the signal has nothing left to do (Python's and the OS's default
    would end the process with KeyboardInterrupt or -SIGTERM instead of 0).
    A signal that arrives before uvicorn took over starts the graceful stop.
    """

    def stop(sig: int, frame: FrameType | None) -> None:
        if not server.should_exit:
            server.handle_exit(sig, frame)

    return stop


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop, non-zero if start-up failed."""
    logging.config.dictConfig(log_config(settings.log_level))
    echo_port = None
    if settings.upstream is None:
        # uvicorn binds the server's port only after the app has started, and the echo
        # backend binds during that start: its port must not be the server's own.
        echo_port = free_port(exclude=settings.port)
        log.warning(
            "no upstream configured: using embedded echo backend at http://127.0.0.1:%d",
            echo_port,
        )
    for name in unknown_env_vars():
        log.warning("ignoring unknown setting %s (see rollout-sessions serve --help)", name)
    if settings.api_key is None:
        log.info("no API_KEY: every route is open to any client that can connect")
    else:
        log.info("API_KEY set: every route but /health needs 'Authorization: Bearer <key>'")
    try:
        app = create_app(settings, echo_port=echo_port)
    except JournalError as exc:
        log.error("cannot start: %s", exc)
        return 2
    app.on_start += settle_gc
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(settings.header_timeout_s, connection_cap()),
        ws="none",
        lifespan="on",
        proxy_headers=False,  # clients connect directly; no X-Forwarded-* to trust
        log_config=None,
        access_log=False,
        backlog=BACKLOG,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = Server(config, GRACEFUL_SHUTDOWN_S)
    stop = stop_handler(server)
    originals = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when start-up fails
        return int(exc.code or 1)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
    if not server.started:
        return 1
    log.info("stopped")
    return 0
