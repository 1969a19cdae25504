"""Soak and chaos: a long rollout with faults, checked against a model of what must be true.

Many agents run sessions of 2-8 realistic turns (answers of ~800 tokens with
``meta_info.output_token_logprobs`` and OpenAI-style ``logprobs.content``,
400-word tool results, the history growing), through a server (or a cluster)
forwarding to the echo backend. Sessions are minted, created by id or
auto-created; at the end of each the harness GETs the trajectory, checks it,
exports the training sample, checks it against the records token for token,
and DELETEs it; stray retries (chat, GET, DELETE, create-by-id) then hit
deleted ids.

Faults, drawn at random per attempt and counted:

- ``backend_5xx``: the backend answers 500/502/503 (passed through);
- ``backend_timeout``: the backend never answers (the server's 504);
- ``backend_reset``: the backend resets the connection mid-body (502);
- ``backend_malformed``: the backend answers non-JSON (502);
- ``backend_slow``: the backend answers after 0.3-1.2 s (200);
- ``client_disconnect``: the client gives up while the backend is slow;
- ``client_abort_upload``: the client closes with half its body sent;
- ``kill9`` (journal on, server started here): ``kill -9`` and a restart on
  the same data dir, at evenly spread times;
- ``disk_full`` (journal on, server started here, as root): the data dir is
  on a tmpfs of its own, filled to the last byte for a few seconds between
  the kills, then freed. Turns, creates and deletes answer 507 (or 503 for
  the journal's own I/O errors on the full disk) and change nothing; the
  harness retries them. ``/health`` must answer 503 while it lasts and 200
  again once space is back.

An attempt whose outcome the client cannot know (a disconnect, a killed
server) is retried after a pause, as a harness retries; the model knows such
a turn may be recorded and then superseded by the retry.

Invariants, checked at every restart and at the end (and per session when
the harness reads it):

- every turn answered 200 is in its session's trajectory, in order, with the
  answer the client got; nothing else is, except one turn the model knows
  may be pending;
- a deleted id answers 404 to chat, GET, DELETE and create, always;
- records and the samples export agree token for token (completion ids and
  logprobs per turn, the whole token list);
- resident memory and open file descriptors are flat after warm-up: over the
  last 80% of the run (less the first seconds after each restart), their
  least-squares trend moves them by at most +-5% (``flatness``, ``--flat-band``);
- no 500 except the backend's own, injected;
- a refused write (507) changed nothing: a turn refused for lack of space
  is never in the trajectory, a session whose DELETE was refused is still
  there, and one deleted with 204 never comes back.

    .venv/bin/python -m rollout_sessions.testing.soak --duration 600 \
        --json benchmarks/results/soak.json --plot benchmarks/plots/soak.png
    .venv/bin/python -m rollout_sessions.testing.soak --duration 60   # what CI runs

Exit status 0 when every invariant held (and, with ``--min-faults K``, every
fault class was injected at least K times).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from rollout_sessions.testing.processes import ManagedProcess, free_port, serve_argv, start_echo

HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"
BACKEND_FAULTS = (
    "backend_5xx",
    "backend_timeout",
    "backend_reset",
    "backend_malformed",
    "backend_slow",
)
CLIENT_FAULTS = ("client_disconnect", "client_abort_upload")
FAULTS = (*BACKEND_FAULTS, *CLIENT_FAULTS, "kill9", "disk_full")
DISK_FULL_S = 3.0  # how long each disk-full episode lasts
DISK_BYTES = 256 << 20  # the data dir's own tmpfs
# Twice the slowest injected answer (backend_slow: up to 1.2 s), so that a busy
# machine does not turn a slow answer into a timeout.
UPSTREAM_TIMEOUT_S = 2.5
RETRY_PAUSE_S = 1.0  # longer than any answer a disconnected client left behind
RESTART_WARMUP_S = 8.0
SAMPLE_EVERY_S = 0.25
FLAT_BAND = 0.05  # the default; --flat-band
WORDS = [f"w{i:03d}" for i in range(1000)]


class Unknown(Exception):
    """The request's outcome cannot be known (connection lost, client gave up)."""


# --- the server under test ------------------------------------------------------------


class Target:
    """A server started here (restartable on the same port and data dir), or a URL."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.workdir = Path(tempfile.mkdtemp(prefix="rollout-sessions-soak-"))
        self.echo: ManagedProcess | None = None
        self.proc: ManagedProcess | None = None
        self.url = a.url
        self.restarts = 0
        self.disk: Path | None = None  # the data dir's own tmpfs, when one could be mounted
        self.disk_full = False  # a disk-full episode is on

    @property
    def managed(self) -> bool:
        return self.a.url is None

    def start(self) -> None:
        if not self.managed:
            return
        self.echo = start_echo(0.0)
        port = free_port()
        flags = ["--upstream", self.echo.url, "--upstream-timeout-s", str(UPSTREAM_TIMEOUT_S)]
        data = self.workdir / "data"
        if self.a.journal and self.a.disk_full:
            disk = self.workdir / "disk"
            disk.mkdir()
            mount = ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)]
            if subprocess.run(mount, capture_output=True).returncode == 0:
                self.disk, data = disk, disk / "data"
            else:
                print("disk_full faults off: mounting a tmpfs needs root")
        flags += ["--log-level", "warning", "--data-dir", str(data)]
        if not self.a.journal:
            flags.append("--no-journal")
        self.argv = serve_argv(port, *flags)
        self.proc = self._spawn(port)
        self.url = self.proc.url

    def _spawn(self, port: int) -> ManagedProcess:
        env = None
        if self.disk is not None:
            # The grower's 256 KB bodies would raise glibc's dynamic mmap
            # threshold, and its heap then keeps their high-water mark: a level
            # step the flatness check reads as growth. A fixed threshold hands
            # such buffers back when freed; a leak still shows.
            env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        proc = ManagedProcess(self.argv, port, env=env, cwd=self.workdir)
        proc.wait_healthy(timeout=120)
        return proc

    def kill_and_restart(self) -> float:
        """kill -9, then the same command on the same port and data dir; seconds down."""
        assert self.proc is not None
        began = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.proc.wait()
        port = self.proc.port
        self.proc.cleanup()
        self.proc = self._spawn(port)
        self.restarts += 1
        return time.monotonic() - began

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [psutil.Process(self.proc.pid)]
        return []

    def fill_disk(self) -> None:
        """Every free byte of the data dir's disk taken (at once: fallocate);
        called again, what was freed since is taken too."""
        assert self.disk is not None
        fd = os.open(self.disk / "ballast", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            free = os.statvfs(self.disk)
            size = free.f_bavail * free.f_frsize
            while size > 0:  # tmpfs may round: take what is left down to the last page
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                except OSError:
                    size //= 2
                    if size < 4096:
                        break
        finally:
            os.close(fd)
        self.disk_full = True

    def free_disk(self) -> None:
        assert self.disk is not None
        with contextlib.suppress(FileNotFoundError):
            (self.disk / "ballast").unlink()
        self.disk_full = False

    def stop(self) -> None:
        for proc in (self.proc, self.echo):
            if proc is not None:
                proc.cleanup()
        if self.disk is not None:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- the model --------------------------------------------------------------------------


@dataclass
class SessionModel:
    sid: str
    kind: str
    confirmed: list[str] = field(default_factory=list)  # answers the client got, in order
    pending: list[str] = field(default_factory=list)  # answers that may have been recorded
    delete_sent: bool = False  # from then on the session may be gone
    delete_unknown: bool = False  # a DELETE whose answer was lost: it may have landed


@dataclass
class Model:
    violations: list[str] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    active: dict[int, SessionModel] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    turn_times: list[float] = field(default_factory=list)
    # Until when a journal write may be refused for lack of space: a disk-full
    # episode, and the writes queued before it ended.
    full_until: float = 0.0

    def refused(self, status: int, body: Any) -> bool:
        """A write the journal refused (507, or its own 503 on the full disk):
        it changed nothing, and the harness retries it."""
        if status not in (503, 507) or time.monotonic() > self.full_until:
            return False
        error = body.get("error", "") if isinstance(body, dict) else ""
        if not error.startswith(("journal full", "journal write failed", "cannot mint")):
            return False
        self.counts[f"refused_{status}"] += 1
        return True

    def violate(self, text: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(text)
        self.counts["violations"] += 1


# --- HTTP with a gate (closed while the server restarts) -----------------------------------


class Client:
    def __init__(self, url: str, agents: int) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=agents + 8),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.gate = asyncio.Event()
        self.gate.set()
        self.inflight = 0

    async def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60.0, checker: bool = False
    ) -> tuple[int, Any]:
        """``checker``: the restart checks, which run while the gate holds agents back."""
        if not checker:
            await self.gate.wait()
        self.inflight += 1
        data = orjson.dumps(body) if body is not None else None
        headers = {"Accept": "application/json"}  # the samples export answers JSON then
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.http.request(
                method,
                self.url + path,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
                ctype = resp.headers.get("Content-Type", "")
                return resp.status, orjson.loads(raw) if raw and "json" in ctype else raw
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise Unknown(type(exc).__name__) from None
        finally:
            self.inflight -= 1

    async def abort_upload(self, path: str, body: bytes) -> None:
        """Send the head and half the body, then close."""
        await self.gate.wait()
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, int(port))
            head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
            writer.write(body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()

    async def close(self) -> None:
        await self.http.close()


# --- agents ---------------------------------------------------------------------------------


class Agent:
    def __init__(self, k: int, a: argparse.Namespace, model: Model, client: Client) -> None:
        self.k = k
        self.a = a
        self.model = model
        self.client = client
        self.rnd = random.Random(a.seed * 1000 + k)
        self.serial = 0

    def text(self, words: int) -> str:
        self.serial += 1
        head = f"a{self.k}-n{self.serial}"
        return head + " " + " ".join(self.rnd.choice(WORDS) for _ in range(words))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            session = await self.create()
            self.model.active[self.k] = session
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": "You are a careful agent."},
                {"role": "user", "content": "Task: " + self.text(60)},
            ]
            for _ in range(self.rnd.randint(2, 8)):
                if not await self.turn(session, messages):
                    break
                messages.append({"role": "tool", "content": "Tool result: " + self.text(400)})
            else:
                await self.finish(session)
            del self.model.active[self.k]
            await self.stray_retry()

    async def create(self) -> SessionModel:
        kind = self.rnd.choice(("minted", "by_id", "auto"))
        if kind == "auto":
            return SessionModel(
                f"soak{self.a.seed}-auto-{self.k}-{self.serial}-{time.time_ns()}", kind
            )
        sid = (
            f"soak{self.a.seed}-id-{self.k}-{self.serial}-{time.time_ns()}"
            if kind == "by_id"
            else None
        )
        while True:
            try:
                status, body = await self.client.call(
                    "POST", "/sessions", {"session_id": sid} if sid else None
                )
            except Unknown:
                await asyncio.sleep(RETRY_PAUSE_S)
                continue  # a lost mint is an orphan; a by-id retry may find it (409)
            if status == 200 or (status == 409 and sid is not None):
                self.model.counts[f"created_{kind}"] += 1
                return SessionModel(body["session_id"] if status == 200 else sid, kind)
            if self.model.refused(status, body):
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            self.model.violate(f"create {kind}: unexpected {status} {body!r:.200}")
            await asyncio.sleep(RETRY_PAUSE_S)

    def fault(self) -> str | None:
        if self.rnd.random() >= self.a.fault_rate:
            return None
        return self.rnd.choice((*BACKEND_FAULTS, *CLIENT_FAULTS))

    async def turn(self, session: SessionModel, messages: list[dict[str, Any]]) -> bool:
        """One turn, retried until answered 200; False if the session was lost."""
        path = f"/sessions/{session.sid}{CHAT}"
        while True:
            fault = self.fault()
            answer = self.text(160)  # ~800 echo tokens (one per byte)
            control: dict[str, Any] = {"text": answer, "logprobs_content": True}
            expect = {200}
            if fault == "backend_5xx":
                control["status"] = self.rnd.choice((500, 502, 503))
                expect = {control["status"]}
            elif fault == "backend_timeout":
                control["fault"], expect = "hang", {504}
            elif fault == "backend_reset":
                control["fault"], expect = "reset_mid_body", {502}
            elif fault == "backend_malformed":
                control["fault"], expect = "not_json", {502}
            elif fault == "backend_slow":
                control["latency_ms"] = self.rnd.randint(300, 1200)
            elif fault == "client_disconnect":  # answered within RETRY_PAUSE_S of giving up
                control["latency_ms"] = self.rnd.randint(300, 700)
            body = {"messages": messages, "logprobs": True, "max_tokens": 1024, "echo": control}
            if fault == "client_abort_upload":
                self.model.faults[fault] += 1
                await self.client.abort_upload(path, orjson.dumps(body))
                continue  # nothing can have been recorded: the body never arrived
            timeout = 0.15 if fault == "client_disconnect" else 60.0
            began = time.monotonic()
            try:
                status, reply = await self.client.call("POST", path, body, timeout)
            except Unknown:
                if fault == "client_disconnect":
                    self.model.faults[fault] += 1
                session.pending.append(answer)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if fault is not None:
                self.model.faults[fault] += 1
            if status == 200 and 200 in expect:
                got = reply["choices"][0]["message"]
                if got.get("content") != answer:
                    self.model.violate(f"{session.sid}: answer {got!r:.120} is not the backend's")
                session.confirmed.append(answer)
                session.pending.clear()
                self.model.counts["turns"] += 1
                self.model.turn_times.append(time.monotonic())
                self.model.counts["turn_ms_total"] += int((time.monotonic() - began) * 1000)
                messages.append(got)
                return True
            if status in expect:
                self.model.counts[f"explained_{status}"] += 1
                continue
            if self.model.refused(status, reply):  # not recorded: never pending
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            self.model.violate(
                f"{session.sid}: chat answered {status} {reply!r:.200} (fault {fault})"
            )
            return False

    async def finish(self, session: SessionModel) -> None:
        """The harness: read, check, export, check, delete."""
        await check_session(self.client, self.model, session, exact=True)
        session.delete_sent = True
        while True:
            try:
                status, reply = await self.client.call("DELETE", f"/sessions/{session.sid}")
            except Unknown:
                session.delete_unknown = True
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if self.model.refused(status, reply):  # still live, all of it
                await check_session(self.client, self.model, session, exact=True)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if status == 404 and session.delete_unknown:
                self.model.counts["explained_delete_404"] += 1
            elif status != 204:
                self.model.violate(f"{session.sid}: DELETE answered {status}")
            break
        self.model.deleted.append(session.sid)
        self.model.counts["deleted"] += 1

    async def stray_retry(self) -> None:
        if self.model.deleted:
            how = self.rnd.choice(("chat", "get", "delete", "create"))
            await probe_deleted(self.client, self.model, self.rnd.choice(self.model.deleted), how)


async def probe_deleted(
    client: Client, model: Model, sid: str, how: str, checker: bool = False
) -> None:
    """A stray retry at a deleted id: anything but 404 is a violation."""
    method, path, body = {
        "chat": (
            "POST",
            f"/sessions/{sid}{CHAT}",
            {"messages": [{"role": "user", "content": "x"}]},
        ),
        "get": ("GET", f"/sessions/{sid}", None),
        "delete": ("DELETE", f"/sessions/{sid}", None),
        "create": ("POST", "/sessions", {"session_id": sid}),
    }[how]
    try:
        status, answer = await client.call(method, path, body, checker=checker)
    except Unknown:
        return
    model.counts["stray_retries"] += 1
    if status != 404:
        model.violate(f"deleted {sid}: stray {how} answered {status} {answer!r:.120}")


async def check_session(
    client: Client, model: Model, session: SessionModel, exact: bool, checker: bool = False
) -> None:
    """The session's trajectory against the model; the harness also checks its sample."""
    try:
        status, body = await client.call("GET", f"/sessions/{session.sid}", checker=checker)
    except Unknown:
        return
    model.counts["session_checks"] += 1
    if status == 404 and session.delete_sent:  # its DELETE was in flight at a restart
        model.counts["explained_get_404"] += 1
        return
    if status != 200:
        where = "a restart check" if checker else "the harness"
        model.violate(f"{session.sid}: GET by {where} answered {status}")
        return
    records = body["records"]
    contents = [r["response"]["choices"][0]["message"].get("content") for r in records]
    n = len(session.confirmed)
    if contents[:n] != session.confirmed:
        model.violate(
            f"{session.sid}: answered turns not all in the trajectory ({len(contents)} vs {n})"
        )
        return
    extra = contents[n:]
    allowed = 0 if exact else 1
    if len(extra) > allowed or any(x not in session.pending for x in extra):
        model.violate(f"{session.sid}: {len(extra)} unexplained records after the answered ones")
        return
    if not checker:
        await check_export(client, model, session, body)


async def check_export(client: Client, model: Model, session: SessionModel, body: dict) -> None:
    try:
        status, sample = await client.call(
            "POST", f"/sessions/{session.sid}/samples", {}, timeout=60
        )
    except Unknown:
        return
    if status != 200 or not isinstance(sample, dict):
        model.violate(f"{session.sid}: samples answered {status}")
        return
    model.counts["export_checks"] += 1
    tokens = sample["tokens"]
    if tokens != body["metadata"]["accumulated_token_ids"]:
        model.violate(f"{session.sid}: export tokens differ from the trajectory's")
    turns = sample["metadata"]["turns"]
    if len(turns) != len(body["records"]):
        model.violate(
            f"{session.sid}: export has {len(turns)} turns, records {len(body['records'])}"
        )
        return
    for (start, end), record in zip(turns, body["records"], strict=True):
        pairs = record["response"]["choices"][0]["meta_info"]["output_token_logprobs"]
        if tokens[start:end] != [t for _, t, _ in pairs]:
            model.violate(f"{session.sid}: export completion ids differ from a record's")
            return
        lps = sample["rollout_log_probs"][start:end]
        if any(abs(x - lp) > 1e-6 for x, (lp, _, _) in zip(lps, pairs, strict=True)):
            model.violate(f"{session.sid}: export logprobs differ from a record's")
            return
        if sum(sample["loss_mask"][start:end]) != end - start:
            model.violate(f"{session.sid}: loss mask not 1 on a completion")
            return


# --- chaos, sampling, the run ------------------------------------------------------------------


async def chaos(
    target: Target,
    client: Client,
    model: Model,
    a: argparse.Namespace,
    t0: float,
    restarts: list[dict[str, float]],
) -> None:
    """kill -9 and restart at evenly spread times, the checks before agents go
    on; a disk-full episode half-way between two kills (never during one)."""
    if not (target.managed and a.journal):
        return
    events = [((i + 1) / (a.kills + 1), "kill9") for i in range(a.kills)]
    if target.disk is not None:
        events += [((i + 0.5) / (a.kills + 1), "disk_full") for i in range(a.kills + 1)]
    rnd = random.Random(a.seed)
    for at, kind in sorted(events):
        await asyncio.sleep(max(0.0, t0 + a.duration * at - time.monotonic()))
        if kind == "disk_full":
            await disk_full(target, client, model)
            continue
        client.gate.clear()  # agents wait from their next request on
        down = await asyncio.to_thread(target.kill_and_restart)
        model.faults["kill9"] += 1
        while client.inflight:  # what was in flight has failed (or finished) by now
            await asyncio.sleep(0.05)
        await check_all(client, model, rnd)
        restarts.append({"t": time.monotonic() - t0, "down_s": down})
        client.gate.set()


async def disk_full(target: Target, client: Client, model: Model) -> None:
    """The data dir's disk full for ``DISK_FULL_S``, then freed.

    A journal in a steady state writes into space it already has (the WAL
    is reused after each checkpoint, deleted sessions' pages are reused, and
    its vacuum gives pages back, which the ballast takes again at once), so
    while the disk is full a grower sends turns with 256 KB prompts, each the
    first turn of a session of its own, which need new space: they must be
    refused (507) and change nothing, while the agents' turns go on. Once
    space is back, ``/health`` is 200 within seconds, and every grower
    session holds exactly its answered turn (then it is deleted).
    """
    model.full_until = float("inf")
    await asyncio.to_thread(target.fill_disk)
    model.faults["disk_full"] += 1
    episode = model.faults["disk_full"]
    refused = 0
    grown: list[SessionModel] = []
    ends = time.monotonic() + DISK_FULL_S
    while time.monotonic() < ends:
        grower = SessionModel(f"soak-grower-{episode}-{len(grown)}-{time.time_ns()}", "auto")
        answer = f"{grower.sid} answer"
        prompt = [{"role": "user", "content": big_text(len(grown))}]
        body = {"messages": prompt, "echo": {"text": answer, "logprobs_content": True}}
        with contextlib.suppress(Unknown):
            status, reply = await client.call(
                "POST", f"/sessions/{grower.sid}{CHAT}", body, checker=True
            )
            if status == 200:
                grower.confirmed.append(answer)
            elif model.refused(status, reply):
                refused += 1
            else:
                model.violate(f"{grower.sid}: a turn on the full disk answered {status}")
            grown.append(grower)
        await asyncio.to_thread(target.fill_disk)  # what the vacuum gave back
        await asyncio.sleep(0.05)
    target.free_disk()
    model.full_until = time.monotonic() + 2.0  # writes queued before the space came back
    if not refused:
        model.violate("a disk-full episode refused no write: the fault was not injected")
    deadline = time.monotonic() + 15.0
    while True:
        with contextlib.suppress(Unknown):
            status, _ = await client.call("GET", "/health", checker=True)
            if status == 200:
                break
        if time.monotonic() > deadline:
            model.violate("/health not 200 within 15 s of the space coming back")
            break
        await asyncio.sleep(0.2)
    for grower in grown:
        await check_session(client, model, grower, exact=True, checker=True)
        with contextlib.suppress(Unknown):  # a refused first turn created it in memory only
            status, _ = await client.call("DELETE", f"/sessions/{grower.sid}", checker=True)
            if status != 204:
                model.violate(f"{grower.sid}: DELETE after the episode answered {status}")


def big_text(seed: int, size: int = 256 << 10) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(size // 5))


async def check_all(client: Client, model: Model, rnd: random.Random) -> None:
    """Every live session against the model, and a sample of deleted ids four ways."""
    model.counts["restart_checks"] += 1
    for session in list(model.active.values()):
        await check_session(client, model, session, exact=False, checker=True)
    for sid in rnd.sample(model.deleted, min(50, len(model.deleted))):
        for how in ("get", "chat", "delete", "create"):
            await probe_deleted(client, model, sid, how, checker=True)


async def sampler(
    target: Target, model: Model, t0: float, samples: list[dict[str, float]], stop: asyncio.Event
) -> None:
    """RSS, open fds and turns/s (over the last second) four times a second."""
    history: list[tuple[float, int]] = []
    while not stop.is_set():
        await asyncio.sleep(SAMPLE_EVERY_S)
        rss = fds = 0
        for proc in target.processes():
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
                fds += proc.num_fds()
        now = time.monotonic()
        history = [(t, n) for t, n in history if now - t <= 1.0] + [(now, model.counts["turns"])]
        rate = (history[-1][1] - history[0][1]) / max(1e-9, history[-1][0] - history[0][0])
        samples.append(
            {"t": now - t0, "rss": rss, "fds": fds, "turns_per_s": rate, "live": len(model.active)}
        )


def flatness(
    samples: list[dict[str, float]],
    restarts: list[dict[str, float]],
    duration: float,
    key: str,
    band: float = FLAT_BAND,
) -> dict[str, Any]:
    """Is the level flat over the last 80% of the run (minus each restart's warm-up)?

    Flat: the least-squares trend through the kept samples moves the level by
    at most +-``band`` (5%) of their median from the first kept sample to the last. A
    leak is a trend; the jitter of a level that follows the load (sockets
    opening and closing with the requests in flight) averages out. The raw
    range is reported too.
    """
    kept = [
        (x["t"], x[key])
        for x in samples
        if x["t"] >= 0.2 * duration
        and x[key] > 0
        and not any(r["t"] <= x["t"] < r["t"] + RESTART_WARMUP_S for r in restarts)
    ]
    if len(kept) < 8:
        return {"ok": False, "samples": len(kept), "why": "too few samples"}
    times = [t for t, _ in kept]
    values = [v for _, v in kept]
    mid = statistics.median(values)
    slope = statistics.linear_regression(times, values).slope
    drift = slope * (times[-1] - times[0]) / mid
    return {
        "ok": abs(drift) <= band,
        "samples": len(kept),
        "median": mid,
        "drift": drift,
        "min": min(values),
        "max": max(values),
    }


async def soak(a: argparse.Namespace, target: Target) -> dict[str, Any]:
    model = Model()
    assert target.url is not None
    client = Client(target.url, a.agents)
    stop = asyncio.Event()
    samples: list[dict[str, float]] = []
    restarts: list[dict[str, float]] = []
    t0 = time.monotonic()
    agents = [Agent(k, a, model, client) for k in range(a.agents)]
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    side = [
        asyncio.create_task(sampler(target, model, t0, samples, stop)),
        asyncio.create_task(chaos(target, client, model, a, t0, restarts)),
    ]
    await asyncio.sleep(a.duration)
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:  # a session still going after a minute: report, do not hang
        task.cancel()
        model.violate("an agent did not finish its session within 60 s of the end")
    for task in done:
        if task.exception() is not None:
            model.violate(f"agent crashed: {task.exception()!r}")
    await asyncio.gather(*side, return_exceptions=True)
    # The end: every session an agent left behind, and deleted ids four ways.
    await check_all(client, model, random.Random(a.seed + 1))
    await client.close()
    elapsed = time.monotonic() - t0
    internal = model.counts.get("explained_500", 0)
    return {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "elapsed_s": elapsed,
        "turns": model.counts["turns"],
        "turns_per_s": model.counts["turns"] / a.duration,
        "mean_turn_ms": model.counts["turn_ms_total"] / max(1, model.counts["turns"]),
        "faults": {
            name: model.faults[name]
            for name in FAULTS
            if name != "disk_full" or target.disk is not None
        },
        "restarts": restarts,
        "counts": dict(model.counts),
        "injected_500s": internal,
        "rss": flatness(samples, restarts, a.duration, "rss", a.flat_band),
        "fds": flatness(samples, restarts, a.duration, "fds", a.flat_band),
        "violations": model.violations,
        "samples": samples,
    }


def report(res: dict[str, Any], a: argparse.Namespace) -> bool:
    c = res["counts"]
    rows = [
        ("duration", f"{a.duration:.0f} s, {a.agents} agents, fault rate {a.fault_rate}"),
        (
            "turns answered 200",
            f"{res['turns']} ({res['turns_per_s']:.1f}/s, mean {res['mean_turn_ms']:.0f} ms)",
        ),
        (
            "sessions",
            f"minted {c.get('created_minted', 0)}, by id {c.get('created_by_id', 0)}, "
            f"deleted {c.get('deleted', 0)}",
        ),
        *((f"fault {name}", str(n)) for name, n in res["faults"].items()),
        (
            "restarts (kill -9)",
            ", ".join(f"{r['t']:.0f}s (down {r['down_s']:.1f}s)" for r in res["restarts"])
            or "none",
        ),
        (
            "explained error answers",
            ", ".join(f"{k[10:]}: {v}" for k, v in sorted(c.items()) if k.startswith("explained_")),
        ),
        (
            "session checks",
            f"{c.get('session_checks', 0)} (export {c.get('export_checks', 0)}), "
            f"restart checks {c.get('restart_checks', 0)}",
        ),
        ("stray retries at deleted ids", str(c.get("stray_retries", 0))),
    ]
    for key in ("rss", "fds"):
        f = res[key]
        if "median" in f:
            unit = 2**20 if key == "rss" else 1
            rows.append(
                (
                    f"{key} flat (last 80%)",
                    f"{'yes' if f['ok'] else 'NO'}: median {f['median'] / unit:.0f}, "
                    f"trend {f['drift']:+.1%} over the window; samples "
                    f"{f['min'] / unit:.0f}..{f['max'] / unit:.0f} ({f['samples']})",
                )
            )
        else:
            rows.append((f"{key} flat (last 80%)", f"NO: {f['why']}"))
    rows.append(("violations", str(c.get("violations", 0))))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}}  {v}")
    for text in res["violations"][:20]:
        print("VIOLATION:", text)
    ok = not res["violations"] and res["rss"]["ok"] and res["fds"]["ok"]
    if a.min_faults:
        short = [
            n
            for n, k in res["faults"].items()
            if k < a.min_faults and (n != "kill9" or a.kills) and (n != "disk_full" or a.disk_full)
        ]
        if short:
            print(f"fault classes injected fewer than {a.min_faults} times: {', '.join(short)}")
            ok = False
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return ok


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x["t"] for x in res["samples"]]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    series = (
        ("RSS (MiB)", [x["rss"] / 2**20 for x in res["samples"]]),
        ("open fds", [x["fds"] for x in res["samples"]]),
        ("turns/s", [x["turns_per_s"] for x in res["samples"]]),
    )
    for ax, (label, ys) in zip(axes, series, strict=True):
        ax.plot(xs, ys, lw=1)
        ax.set_ylabel(label)
        for r in res["restarts"]:
            ax.axvline(r["t"], color="red", lw=0.8, ls="--")
        ax.axvline(0.2 * res["params"]["duration"], color="grey", lw=0.8, ls=":")
    axes[-1].set_xlabel("seconds (red: kill -9 and restart; grey: start of the flatness window)")
    fig.suptitle(
        f"soak: {res['turns']} turns, {sum(res['faults'].values())} faults, "
        f"{len(res['violations'])} violations"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--agents", type=int, default=24)
    p.add_argument("--fault-rate", type=float, default=0.3, help="share of attempts with a fault")
    p.add_argument("--kills", type=int, help="kill -9 restarts (default: 2 + one per 2 minutes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--url", help="a running server or cluster (no kill -9 then)")
    p.add_argument(
        "--no-journal", dest="journal", action="store_false", help="memory only (no kills)"
    )
    p.add_argument(
        "--no-disk-full",
        dest="disk_full",
        action="store_false",
        help="no disk-full episodes (on by default when a tmpfs can be mounted: root)",
    )
    p.add_argument("--min-faults", type=int, default=0, help="fail if a fault class got fewer")
    p.add_argument(
        "--flat-band",
        type=float,
        default=FLAT_BAND,
        help="how far RSS and fds may trend over the window, as a share of their median",
    )
    p.add_argument("--json", type=Path, help="write the whole result here")
    p.add_argument("--plot", type=Path, help="a PNG of RSS, fds and turns/s over time")
    a = p.parse_args(argv)
    if a.kills is None:
        a.kills = 2 + int(a.duration // 120)
    target = Target(a)
    try:
        target.start()
        res = asyncio.run(soak(a, target))
    finally:
        target.stop()
    ok = report(res, a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.json}")
    if a.plot:
        plot(res, a.plot)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
