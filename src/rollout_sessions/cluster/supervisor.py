"""Many instances behind one URL: ``rollout-sessions cluster`` and ``cluster-config``.

``rollout-sessions cluster --instances N [--port P] [--base-port B] [serve settings]``
starts N ``serve`` instances on ``127.0.0.1:B..B+N-1`` (B defaults to P+1),
instance k with ``--instance-tag k`` and its own data dir ``DATA_DIR/instance-k``,
every other setting passed through (flags and environment alike). It writes
the HAProxy configuration (``rollout_sessions.cluster.balancer``) into its work dir,
checks it with ``haproxy -c`` and runs HAProxy on ``HOST:P`` in the
foreground. A dead instance is started again with the same tag, port and data
dir (with the journal, its sessions come back); a dead HAProxy stops the
cluster. SIGTERM or SIGINT stops HAProxy gracefully (requests in flight
finish), then the instances. The work dir holds ``haproxy.cfg``, the logs and
``cluster.json`` (pids, ports, tags, data dirs; rewritten on every change).

``rollout-sessions cluster-config --instance [TAG@]HOST:PORT ... [--port P]``
prints the same configuration for instances on several hosts (TAG defaults
to the instance's position; tags must be unique).
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from rollout_sessions.cluster.balancer import Instance, haproxy_config
from rollout_sessions.config import SPECS, Settings, SettingsError, add_arguments, load_settings

log = logging.getLogger("rollout_sessions.cluster.supervisor")

MIN_HAPROXY = (2, 6)
WORKDIR = "rollout-sessions-cluster"
READY_TIMEOUT_S = 300.0  # an instance replaying a large journal takes a while
RESTART_DELAY_S = 1.0
GRACEFUL_S = 60.0
# Settings the cluster sets per instance (the rest pass through as given).
PER_INSTANCE = {"host", "port", "instance_tag", "data_dir"}
INSTANCE_HOST = "127.0.0.1"
INSTALL_HINT = "install HAProxy 2.6 or later (Debian/Ubuntu: apt-get install haproxy)"


class ClusterError(Exception):
    """A cluster that cannot start; the message says why."""


# --- cluster-config -----------------------------------------------------------------


def parse_instance(text: str, position: int) -> Instance:
    """``[TAG@]HOST:PORT``; TAG (0-4095) defaults to the position in the list."""
    match = re.fullmatch(r"(?:(\d{1,4})@)?([^\s:@]+):(\d{1,5})", text)
    if match is None:
        raise ClusterError(f"--instance {text!r}: expected [TAG@]HOST:PORT")
    tag = int(match[1]) if match[1] is not None else position
    port = int(match[3])
    if not 0 <= tag <= 4095:
        raise ClusterError(f"--instance {text!r}: the tag must be 0-4095")
    if not 1 <= port <= 65535:
        raise ClusterError(f"--instance {text!r}: the port must be 1-65535")
    return Instance(tag, match[2], port)


def config_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rollout-sessions cluster-config",
        description="Print the HAProxy configuration for instances on several hosts. "
        "--port and --host say where HAProxy listens; the other settings (timeouts, "
        "body limit) must be the instances' own.",
    )
    parser.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="[TAG@]HOST:PORT",
        help="an instance, in routing order (repeat; TAG defaults to its position)",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
        instances = [parse_instance(text, k) for k, text in enumerate(args.instance)]
        sys.stdout.write(haproxy_config(instances, settings.host, settings.port, settings))
    except (SettingsError, ClusterError, ValueError) as exc:
        print(f"rollout-sessions cluster-config: error: {exc}", file=sys.stderr)
        return 2
    return 0


# --- cluster ------------------------------------------------------------------------


@dataclass
class Member:
    """One local instance and the process that serves it."""

    instance: Instance
    argv: list[str]
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    restarts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"--- rollout-sessions cluster: starting {self.argv}\n".encode())
        self._log.flush()
        self.process = _spawn(self.argv, self._log)
        self.restart_at = None

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def find_haproxy() -> str:
    """The haproxy binary on PATH, checked to be 2.6 or later."""
    path = shutil.which("haproxy")
    if path is None:
        raise ClusterError(f"haproxy not found on PATH: {INSTALL_HINT}")
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if match is None or (int(match[1]), int(match[2])) < MIN_HAPROXY:
        found = match[0] if match else out.strip()[:80] or "unknown version"
        raise ClusterError(f"{path}: {found} is too old: {INSTALL_HINT}")
    return path


def instance_argv(args: argparse.Namespace, settings: Settings, k: int, port: int) -> list[str]:
    """The ``serve`` command of instance k: the given flags, then its own."""
    argv = [sys.executable, "-m", "rollout_sessions", "serve"]
    for spec in SPECS:
        value = getattr(args, spec.field, None)
        if value is not None and spec.field not in PER_INSTANCE:
            argv += [spec.flag, str(value)]
    data_dir = Path(settings.data_dir) / f"instance-{k}"
    argv += ["--host", INSTANCE_HOST, "--port", str(port), "--instance-tag", str(k)]
    return [*argv, "--data-dir", str(data_dir)]


def cluster_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rollout-sessions cluster",
        description="Run N serve instances behind HAProxy on one URL, with exact session "
        "affinity. --host and --port say where HAProxy listens; every other setting "
        "goes to every instance.",
    )
    parser.add_argument("--instances", type=int, required=True, metavar="N")
    parser.add_argument("--base-port", type=int, metavar="B", help="instance k listens on B+k")
    parser.add_argument("--workdir", default=WORKDIR, help=f"(default: ./{WORKDIR})")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rollout-sessions cluster: %(message)s")
    try:
        cluster = Cluster.from_args(args)
        cluster.start()
    except (SettingsError, ClusterError, ValueError) as exc:
        print(f"rollout-sessions cluster: error: {exc}", file=sys.stderr)
        return 2
    return cluster.run()


class Cluster:
    def __init__(
        self, settings: Settings, members: list[Member], workdir: Path, haproxy: str
    ) -> None:
        self.settings = settings
        self.members = members
        self.workdir = workdir
        self.haproxy_bin = haproxy
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Cluster:
        settings = load_settings(args)
        n = args.instances
        if not 1 <= n <= 4096:
            raise ClusterError("--instances must be 1-4096")
        if args.instance_tag is not None:
            raise ClusterError("--instance-tag is set per instance by the cluster (k for k)")
        base = args.base_port if args.base_port is not None else settings.port + 1
        ports = range(base, base + n)
        if base < 1 or ports[-1] > 65535 or settings.port in ports:
            raise ClusterError(
                f"instance ports {base}-{ports[-1]} must be 1-65535, without {settings.port}"
            )
        haproxy = find_haproxy()
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        members = [
            Member(
                Instance(k, INSTANCE_HOST, port),
                instance_argv(args, settings, k, port),
                Path(settings.data_dir).resolve() / f"instance-{k}",
                workdir / f"instance-{k}.log",
            )
            for k, port in enumerate(ports)
        ]
        return cls(settings, members, workdir, haproxy)

    # -- start-up -------------------------------------------------------------------

    def start(self) -> None:
        for member in self.members:
            member.start()
        try:
            for member in self.members:
                _wait_ready(member)
            config = self.workdir / "haproxy.cfg"
            instances = [m.instance for m in self.members]
            config.write_text(
                haproxy_config(instances, self.settings.host, self.settings.port, self.settings)
            )
            check = subprocess.run(
                [self.haproxy_bin, "-c", "-f", str(config)], capture_output=True, text=True
            )
            if check.returncode != 0:
                raise ClusterError(f"haproxy -c rejected {config}:\n{check.stdout}{check.stderr}")
            haproxy_log = (self.workdir / "haproxy.log").open("ab")
            self.haproxy = _spawn([self.haproxy_bin, "-W", "-db", "-f", str(config)], haproxy_log)
            haproxy_log.close()  # the child has its own copy
            _wait_listening(self.haproxy, self.settings.host, self.settings.port)
        except BaseException:
            self._stop_instances()
            raise
        self._write_state()
        log.info(
            "listening on http://%s:%d: %d instances on ports %d-%d; config %s; logs in %s",
            self.settings.host,
            self.settings.port,
            len(self.members),
            self.members[0].instance.port,
            self.members[-1].instance.port,
            config,
            self.workdir,
        )

    # -- supervision ----------------------------------------------------------------

    def run(self) -> int:
        """Keep the instances up until SIGTERM/SIGINT; the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        status = 0
        while not self.stopping.wait(0.2):
            assert self.haproxy is not None
            if self.haproxy.poll() is not None:
                log.error("haproxy exited (status %s): stopping", self.haproxy.returncode)
                status = 1
                break
            self._tend()
        self._stop_haproxy()
        self._stop_instances()
        log.info("stopped")
        return status

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.stopping.set()

    def _tend(self) -> None:
        now = time.monotonic()
        changed = False
        for member in self.members:
            process = member.process
            if member.restart_at is None and process is not None and process.poll() is not None:
                log.warning(
                    "instance %d (port %d) exited with status %s: restarting it",
                    member.instance.tag,
                    member.instance.port,
                    process.returncode,
                )
                member.restart_at = now + RESTART_DELAY_S
            elif member.restart_at is not None and now >= member.restart_at:
                member.restarts += 1
                member.start()
                changed = True
        if changed:
            self._write_state()

    # -- shutdown -------------------------------------------------------------------

    def _stop_haproxy(self) -> None:
        process = self.haproxy
        if process is None or process.poll() is not None:
            return
        # SIGUSR1: soft stop; the listener closes, requests in flight finish.
        process.send_signal(signal.SIGUSR1)
        _reap(process, GRACEFUL_S)

    def _stop_instances(self) -> None:
        live = [m.process for m in self.members if m.process and m.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            _reap(process, GRACEFUL_S)
        for member in self.members:
            member.close_log()
        state = self.workdir / "cluster.json"
        state.unlink(missing_ok=True)

    def _write_state(self) -> None:
        """``cluster.json``: where everything is, for operators and tests."""
        state = {
            "balancer": {
                "url": f"http://{self.settings.host}:{self.settings.port}",
                "pid": self.haproxy.pid if self.haproxy else None,
                "config": str(self.workdir / "haproxy.cfg"),
                "log": str(self.workdir / "haproxy.log"),
            },
            "instances": [
                {
                    "tag": m.instance.tag,
                    "port": m.instance.port,
                    "pid": m.process.pid if m.process else None,
                    "restarts": m.restarts,
                    "data_dir": str(m.data_dir),
                    "log": str(m.log_path),
                }
                for m in self.members
            ],
        }
        tmp = self.workdir / "cluster.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.workdir / "cluster.json")


# --- processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGTERM when the cluster process dies (even by kill -9)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal reaches the cluster only, which
    # then stops HAProxy before the instances.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
    )


def _reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        command = " ".join(map(str, process.args[:4]))
        log.warning("%d (%s) did not stop within %gs: killing it", process.pid, command, timeout)
        process.kill()
        process.wait()


def _wait_ready(member: Member) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    instance = member.instance
    while time.monotonic() < deadline:
        assert member.process is not None
        if member.process.poll() is not None:
            raise ClusterError(
                f"instance {instance.tag} exited with status {member.process.returncode} "
                f"at start-up; its log: {member.log_path}\n{_tail(member.log_path)}"
            )
        if _healthy(instance.host, instance.port):
            return
        time.sleep(0.1)
    raise ClusterError(f"instance {instance.tag} not ready after {READY_TIMEOUT_S:g}s")


def _healthy(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _wait_listening(process: subprocess.Popen[bytes], host: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"haproxy exited with status {process.returncode} at start-up")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise ClusterError(f"haproxy not listening on {host}:{port} after 30s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
