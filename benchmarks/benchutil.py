"""Shared plumbing of the HTTP benchmarks: servers, the load generator, output.

Servers run as subprocesses (``rollout_sessions.testing.processes``); the
load generator runs as its own process (``benchmarks/loadgen.py``) so its CPU
is never the server's; results go to JSON under ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def reference_argv(port: int, upstream: str | None = None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "rollout_sessions.testing.reference_server", "--port", str(port)]
    if upstream:
        argv += ["--upstream", upstream]
    return argv + list(extra)


def echo_argv(port: int, latency_ms: float = 0.0) -> list[str]:
    argv = [sys.executable, "-m", "rollout_sessions.cli", "echo-backend", "--port", str(port)]
    if latency_ms:
        argv += ["--latency-ms", str(latency_ms)]
    return argv


@contextlib.contextmanager
def started(
    name: str, argv_for_port: Any, url: str | None = None, health_path: str | None = "/health"
) -> Iterator[str]:
    """Yield the base URL of a server: ``url`` if given, else a subprocess we start
    (its log's tail is printed if it fails)."""
    with started_process(name, argv_for_port, url, health_path) as proc:
        yield proc.url if proc is not None else url.rstrip("/")  # type: ignore[union-attr]


@contextlib.contextmanager
def started_process(
    name: str, argv_for_port: Any, url: str | None = None, health_path: str | None = "/health"
) -> Iterator[ManagedProcess | None]:
    """Like ``started``, but yields the process itself (``None`` for a given ``url``)."""
    if url:
        yield None
        return
    port = free_port()
    with ManagedProcess(argv_for_port(port), port, env=dict(os.environ)) as proc:
        try:
            proc.wait_healthy(health_path)
            yield proc
        except Exception:
            print(f"--- {name} log (tail) ---\n{proc.log()[-4000:]}", file=sys.stderr)
            raise


def ours_argv(upstream: str | None = None, *flags: str):
    def argv(port: int) -> list[str]:
        extra = ["--upstream", upstream] if upstream else []
        return serve_argv(port, "--log-level", "warning", *extra, *flags)

    return argv


def run_loadgen(*args: str, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``loadgen.py`` in its own process; return its JSON result."""
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}):\n{out.stderr[-4000:]}")
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternating_rounds(
    urls: dict[str, str], rounds: int, loadgen_args: Any
) -> dict[str, list[dict[str, Any]]]:
    """Run ``loadgen.py`` against every target, ``rounds`` times, reversing the
    order every other round so that machine noise hits all targets alike.
    ``loadgen_args(name, url)`` gives the load generator's arguments."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for r in range(rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for name in order:
            runs[name].append(run_loadgen(*loadgen_args(name, urls[name])))
    return runs


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {path}")


def finish(res: dict[str, Any], targets: list[dict[str, Any]], path: Path) -> None:
    """Print each target's verdict and write the results (targets included)."""
    res["targets"] = targets
    if targets:
        width = max(len(t["target"]) for t in targets)
        print("\n== targets ==")
        for t in targets:
            print(f"{verdict(t['met'])}  {t['target']:{width}} {t['value']:.3f}")
    write_json(path, res)


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def verdict(met: bool) -> str:
    return "MET " if met else "MISS"
