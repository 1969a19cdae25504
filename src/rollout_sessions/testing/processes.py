"""Server and backend subprocesses: start, wait until healthy, stop, read the log.

``ManagedProcess`` runs a command in its own process group with its output
in a log file; ``start_server`` starts ``rollout-sessions serve`` on a free
port and waits for ``/health``. Environment variables ``ROLLOUT_SESSIONS_*``
of the caller are never inherited: only what is passed in ``env`` reaches
the child.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rollout_sessions.web.server import free_port

__all__ = [
    "ManagedProcess",
    "clean_env",
    "free_port",
    "free_port_range",
    "serve_argv",
    "start_echo",
    "start_server",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLOUT_SESSIONS_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port_range(n: int, host: str = HOST) -> int:
    """A first port B with B..B+n-1 all free right now (for a cluster's instances)."""
    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def serve_argv(port: int, *flags: str) -> list[str]:
    """``rollout-sessions serve`` on ``port`` with ``flags``, as a subprocess argv."""
    return [sys.executable, "-m", "rollout_sessions.cli", "serve", "--port", str(port), *flags]


class ManagedProcess:
    """A subprocess in its own process group whose output goes to a log file.

    It runs in ``cwd``, by default a fresh directory of its own (removed at
    cleanup), so a server's default ``DATA_DIR`` is never shared.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self._own_dir = tempfile.mkdtemp(prefix="rollout-sessions-run-") if cwd is None else None
        cwd = cwd if cwd is not None else self._own_dir
        fd, name = tempfile.mkstemp(prefix="rollout-sessions-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            # Own process group: killing it never orphans what it started.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait_healthy(self, path: str | None = "/health", timeout: float = START_TIMEOUT_S) -> None:
        """Until ``GET path`` answers 200 (``path=None``: until the port accepts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                command = " ".join(self.argv[1:5])
                raise RuntimeError(
                    f"{command} exited with {self.proc.returncode} during start-up:\n{self.log()}"
                )
            if _ready(self.url, path):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.url} not healthy after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal and wait; kill the group after ``timeout``. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                raise
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL this process and everything it started (its own group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _ready(url: str, path: str | None) -> bool:
    if path is None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url + path, timeout=1.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start_server(
    *flags: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait: bool = True,
    cls: type[ManagedProcess] = ManagedProcess,
    cwd: str | os.PathLike[str] | None = None,
) -> ManagedProcess:
    """``rollout-sessions serve *flags`` on ``port`` (a free one if None)."""
    if port is None:
        port = free_port()
        argv = serve_argv(port, *flags)
    else:
        argv = [sys.executable, "-m", "rollout_sessions.cli", "serve", *flags]
    proc = cls(argv, port, env, cwd=cwd)
    if wait:
        try:
            proc.wait_healthy()
        except Exception:
            proc.cleanup()
            raise
    return proc


def start_echo(
    latency_ms: float = 0.0, *flags: str, cls: type[ManagedProcess] = ManagedProcess
) -> ManagedProcess:
    """``rollout-sessions echo-backend`` on a free port (plus ``flags``), once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "rollout_sessions.cli", "echo-backend"]
    argv += ["--port", str(port), "--latency-ms", str(latency_ms), *flags]
    proc = cls(argv, port)
    try:
        proc.wait_healthy("/health")
    except Exception:
        proc.cleanup()
        raise
    return proc
