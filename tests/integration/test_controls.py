"""Rollout controls over real sockets against the real ``serve``: pinned sampling
(``SAMPLING_OVERRIDES``), sticky routing (``UPSTREAM_ROUTING_HEADER``) and abort on
delete (``CANCEL_ON_DELETE``), with a backend that records headers and bodies and
notices when its client goes away."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ServerProc, serve

from rollout_sessions.testing.processes import clean_env
from rollout_sessions.testing.recording_backend import DELAY_HEADER, RecordingBackend
from rollout_sessions.testing.tokenizers import build_tokenizer

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    with RecordingBackend() as b:
        yield b


def chat_path(sid: str) -> str:
    return f"/sessions/{sid}/v1/chat/completions"


def metric(srv: ServerProc, name: str, labels: str = "") -> float:
    text = srv.get("/metrics").text
    pattern = re.escape(f"rollout_sessions_{name}{{{labels}}}" if labels else name) + r" (\S+)"
    if not labels:
        pattern = re.escape(f"rollout_sessions_{name}") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- SAMPLING_OVERRIDES --------------------------------------------------------


def test_overrides_replace_the_clients_values_and_the_record_shows_them(backend) -> None:
    overrides = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
    srv = serve("--upstream", backend.url, "--sampling-overrides", json.dumps(overrides))
    try:
        body = {"messages": MESSAGES, "temperature": 0.2, "top_p": 1.0, "max_tokens": 7}
        assert srv.post(chat_path("ov-1"), json=body).status_code == 200
        sent = backend.chat_requests()[-1].json()
        assert {k: sent[k] for k in overrides} == overrides
        assert sent["max_tokens"] == 7  # what is not overridden passes as sent
        assert sent["logprobs"] is True  # the forced flags stay
        record = srv.get("/sessions/ov-1").json()["records"][0]
        assert {k: record["request"][k] for k in overrides} == overrides

        # A second turn without any sampling field gets them too.
        answer = srv.get("/sessions/ov-1").json()["records"][0]["response"]
        turn2 = [*MESSAGES, answer["choices"][0]["message"], {"role": "tool", "content": "42"}]
        assert srv.post(chat_path("ov-1"), json={"messages": turn2}).status_code == 200
        sent = backend.chat_requests()[-1].json()
        assert {k: sent[k] for k in overrides} == overrides

        assert metric(srv, "sampling_overrides_applied_total", 'param="temperature"') == 2
        assert metric(srv, "sampling_overrides_applied_total", 'param="top_k"') == 2
        # Only the first turn's temperature differed from the override.
        assert metric(srv, "sampling_overrides_replaced_total", 'param="temperature"') == 1
        assert metric(srv, "sampling_overrides_replaced_total", 'param="top_p"') == 0
    finally:
        srv.cleanup()


def test_overrides_from_the_env_var_and_the_flag_wins(backend) -> None:
    env = {"ROLLOUT_SESSIONS_SAMPLING_OVERRIDES": '{"temperature": 0.7, "seed": 3}'}
    srv = serve("--upstream", backend.url, env=env)
    flagged = serve("--upstream", backend.url, "--sampling-overrides", '{"top_p": 0.9}', env=env)
    try:
        assert srv.post(chat_path("env-1"), json={"messages": MESSAGES}).status_code == 200
        sent = backend.chat_requests()[-1].json()
        assert sent["temperature"] == 0.7 and sent["seed"] == 3
        assert flagged.post(chat_path("flag-1"), json={"messages": MESSAGES}).status_code == 200
        sent = backend.chat_requests()[-1].json()
        assert sent["top_p"] == 0.9 and "temperature" not in sent and "seed" not in sent
    finally:
        srv.cleanup()
        flagged.cleanup()


def test_no_overrides_by_default(backend) -> None:
    srv = serve("--upstream", backend.url)
    try:
        body = {"messages": MESSAGES, "temperature": 0.3}
        assert srv.post(chat_path("plain"), json=body).status_code == 200
        sent = backend.chat_requests()[-1].json()
        assert sent["temperature"] == 0.3 and "top_p" not in sent
    finally:
        srv.cleanup()


def run_serve(*args: str, env: dict[str, str] | None = None) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "rollout_sessions.cli", "serve", "--port", "1", *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"ROLLOUT_SESSIONS_SAMPLING_OVERRIDES": "[1, 2]"}, [], "must be a JSON object"),
        ({"ROLLOUT_SESSIONS_SAMPLING_OVERRIDES": "{temperature: 1}"}, [], "must be a JSON"),
        ({}, ["--sampling-overrides", '"hot"'], "must be a JSON object"),
        ({}, ["--sampling-overrides", '{"logprobs": false}'], "cannot set logprobs"),
        ({}, ["--sampling-overrides", '{"messages": []}'], "cannot set messages"),
    ],
)
def test_bad_overrides_stop_startup_naming_the_variable(env, args, needle) -> None:
    out = run_serve(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert "ROLLOUT_SESSIONS_SAMPLING_OVERRIDES" in out.stderr
    assert needle in out.stderr
    assert "Uvicorn running" not in out.stderr


@pytest.mark.parametrize("value", ["has space", "Host", "content-length", "a:b", ""])
def test_bad_routing_header_stops_startup(value: str) -> None:
    if not value:  # an empty env var is unset: the default applies; the flag is not
        out = run_serve("--upstream-routing-header", " ")
    else:
        out = run_serve("--upstream-routing-header", value)
    assert out.returncode == 2, out.stderr
    assert "ROLLOUT_SESSIONS_UPSTREAM_ROUTING_HEADER" in out.stderr


# -- UPSTREAM_ROUTING_HEADER ---------------------------------------------------


def routing_values(backend: RecordingBackend, name: str) -> list[str | None]:
    return [seen.headers.get(name.lower()) for seen in backend.seen]


@pytest.mark.parametrize(
    ("flags", "env", "header"),
    [
        ((), None, "X-SMG-Routing-Key"),
        (("--upstream-routing-header", "X-Session-Affinity"), None, "X-Session-Affinity"),
        ((), {"ROLLOUT_SESSIONS_UPSTREAM_ROUTING_HEADER": "x-route"}, "x-route"),
    ],
)
def test_every_upstream_call_for_a_session_carries_its_id(backend, flags, env, header) -> None:
    srv = serve("--upstream", backend.url, *flags, env=env)
    try:
        # The client's own value (any case) is replaced, on both routes.
        spoof = {header.upper(): "someone-else", "x-other": "kept"}
        assert srv.post(chat_path("route-a"), json={"messages": MESSAGES}, headers=spoof).ok
        assert srv.get("/sessions/route-b/v1/models", headers=spoof).ok
        assert srv.post("/sessions/route-c/generate", json={"text": "x"}).ok
        assert srv.post(chat_path("route-d"), json={"messages": MESSAGES}).ok
        assert [s.target for s in backend.seen] == [
            "/v1/chat/completions",
            "/v1/models",
            "/generate",
            "/v1/chat/completions",
        ]
        assert routing_values(backend, header) == ["route-a", "route-b", "route-c", "route-d"]
        for seen in backend.seen:  # once, not beside the client's value
            assert sum(k == header.lower() for k in seen.headers) == 1
        assert backend.seen[0].headers["x-other"] == "kept"
        if header.lower() != "x-smg-routing-key":
            assert "x-smg-routing-key" not in backend.seen[3].headers
    finally:
        srv.cleanup()


def test_routing_header_none_sends_nothing(backend) -> None:
    srv = serve("--upstream", backend.url, "--upstream-routing-header", "none")
    try:
        assert srv.post(chat_path("none-a"), json={"messages": MESSAGES}).ok
        assert srv.get("/sessions/none-b/v1/models").ok
        assert routing_values(backend, "x-smg-routing-key") == [None, None]
        # Off means untouched: a client's own value passes as it sent it.
        own = {"X-SMG-Routing-Key": "client-choice"}
        assert srv.post(chat_path("none-c"), json={"messages": MESSAGES}, headers=own).ok
        assert backend.seen[-1].headers["x-smg-routing-key"] == "client-choice"
    finally:
        srv.cleanup()


# -- CANCEL_ON_DELETE ----------------------------------------------------------

NOT_FOUND = "session not found: session_id={}"


async def _turn(
    http: aiohttp.ClientSession, url: str, sid: str, delay: float, k: int, stream: bool = False
) -> tuple[int, Any, float]:
    body = {"messages": [{"role": "user", "content": f"turn {k}"}], "stream": stream}
    async with http.post(
        f"{url}{chat_path(sid)}", json=body, headers={DELAY_HEADER: str(delay)}
    ) as resp:
        raw = await resp.read()
        data = json.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, data, time.monotonic()


async def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def _delete_under_load(
    url: str,
    backend: RecordingBackend,
    victim: str,
    n: int,
    others: list[str],
    victim_delay: float,
    other_delay: float,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        victims = [
            asyncio.create_task(_turn(http, url, victim, victim_delay, k, stream=k % 2 == 1))
            for k in range(n)
        ]
        bystanders = [asyncio.create_task(_turn(http, url, sid, other_delay, 0)) for sid in others]
        await _wait_for(lambda: len(backend.chat_requests()) == n + len(others))
        started = time.monotonic()
        async with http.delete(f"{url}/sessions/{victim}") as resp:
            delete_status = resp.status
        deleted = time.monotonic()
        victim_results = await asyncio.gather(*victims)
        other_results = await asyncio.gather(*bystanders)
    return {
        "started": started,
        "deleted": deleted,
        "delete_status": delete_status,
        "victims": victim_results,
        "others": other_results,
    }


@pytest.mark.parametrize("journal", ["on", "off"])
def test_delete_cancels_32_turns_in_flight(backend, journal: str) -> None:
    srv = serve("--upstream", backend.url, "--journal", journal)
    try:
        # The victim's id is known beforehand and chatted to, as an agent's is.
        others = [f"other-{k}" for k in range(6)]
        out = asyncio.run(_delete_under_load(srv.url, backend, "victim", 32, others, 8.0, 2.0))
        assert out["delete_status"] == 204
        assert out["deleted"] - out["started"] < 1.0

        # Every upstream connection of the victim was closed, within a second of
        # the DELETE, long before its answer was due (8 s).
        gone = list(backend.gone)
        assert len(gone) == 32
        assert {g.request.headers["x-smg-routing-key"] for g in gone} == {"victim"}
        assert max(g.at for g in gone) - out["started"] < 1.0

        # Each turn answered 404 (the streaming ones too), at once.
        for status, data, at in out["victims"]:
            assert status == 404
            assert data == {"error": NOT_FOUND.format("victim")}
            assert at - out["started"] < 1.0

        # Other sessions' turns on the same pool finished normally and were recorded.
        for status, data, _at in out["others"]:
            assert status == 200, data
            assert data["choices"][0]["message"]["content"] == "answer to turn 0"
        for sid in others:
            assert len(srv.get(f"/sessions/{sid}").json()["records"]) == 1
        assert backend.answered == len(others)

        # Nothing was recorded for the victim; it stays deleted.
        assert srv.get("/sessions/victim").status_code == 404
        assert metric(srv, "chat_turns_total", 'outcome="recorded"') == len(others)
        assert metric(srv, "chat_turns_total", 'outcome="cancelled"') == 32
        assert metric(srv, "upstream_cancelled_total") == 32

        # The pool still serves: new turns on fresh or reused healthy connections.
        assert srv.post(chat_path("after"), json={"messages": MESSAGES}).status_code == 200
        assert backend.answered == len(others) + 1
    finally:
        srv.cleanup()


def test_with_cancel_off_the_turn_finishes_unrecorded(backend) -> None:
    srv = serve("--upstream", backend.url, "--cancel-on-delete", "off")
    try:
        out = asyncio.run(_delete_under_load(srv.url, backend, "keep", 4, ["other"], 1.0, 1.0))
        assert out["delete_status"] == 204
        assert backend.gone == []
        for status, _data, at in out["victims"]:
            assert status == 200
            assert at - out["started"] > 0.5  # answered when the backend answered
        assert backend.answered == 5
        assert metric(srv, "chat_turns_total", 'outcome="recorded"') == 1
        assert metric(srv, "chat_turns_total", 'outcome="closing"') == 4
        assert metric(srv, "upstream_cancelled_total") == 0
        assert srv.get("/sessions/keep").status_code == 404
    finally:
        srv.cleanup()


def test_a_turn_after_delete_makes_no_upstream_call(backend) -> None:
    srv = serve("--upstream", backend.url)
    try:
        assert srv.post(chat_path("late"), json={"messages": MESSAGES}).ok
        assert srv.delete("/sessions/late").status_code == 204
        before = len(backend.seen)
        resp = srv.post(chat_path("late"), json={"messages": MESSAGES})
        assert resp.status_code == 404
        assert resp.json() == {"error": NOT_FOUND.format("late")}
        assert len(backend.seen) == before
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "qwen3", "qwen3", "append_only")


def test_delete_cancels_tito_turns_too(backend, qwen3_tokenizer: Path) -> None:
    srv = serve(
        "--upstream", backend.url, "--tokenizer", str(qwen3_tokenizer), "--tito-model", "qwen3"
    )
    try:
        out = asyncio.run(_delete_under_load(srv.url, backend, "tito", 4, ["tito-other"], 8, 1))
        assert all("input_ids" in seen.json() for seen in backend.chat_requests())
        assert len(backend.gone) == 4
        assert [status for status, _, _ in out["victims"]] == [404] * 4
        assert [status for status, _, _ in out["others"]] == [200]
        assert len(srv.get("/sessions/tito-other").json()["records"]) == 1
    finally:
        srv.cleanup()


async def _race_rounds(url: str, rounds: int, turns: int) -> list[int]:
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for r in range(rounds):
            sid = f"race-{r}"
            # Answers due from 0 to 40 ms; the DELETE lands in the middle of them.
            tasks = [asyncio.create_task(_turn(http, url, sid, 0.005 * k, k)) for k in range(turns)]
            await asyncio.sleep(0.02)
            async with http.delete(f"{url}/sessions/{sid}") as resp:
                assert resp.status in (204, 404)  # 404: no turn had created it yet
            statuses += [status for status, _, _ in await asyncio.gather(*tasks)]
    return statuses


@pytest.mark.parametrize("journal", ["on", "off"])
def test_an_answer_racing_the_delete_is_recorded_and_200_or_unrecorded_and_404(
    backend, journal: str
) -> None:
    srv = serve("--upstream", backend.url, "--journal", journal)
    try:
        statuses = asyncio.run(_race_rounds(srv.url, 20, 9))
        assert set(statuses) <= {200, 404}
        assert 404 in statuses and 200 in statuses  # the race did happen
        # Every 200 was recorded before its DELETE (or lost to a concurrent turn
        # of its session: linear mode keeps one); every 404 was not recorded.
        recorded = metric(srv, "chat_turns_total", 'outcome="recorded"')
        stale = metric(srv, "chat_turns_total", 'outcome="stale"')
        assert statuses.count(200) == recorded + stale
        not_recorded = sum(
            metric(srv, "chat_turns_total", f'outcome="{o}"') for o in ("cancelled", "closing")
        )
        refused = metric(srv, "error_responses_total", 'status="404"')
        assert statuses.count(404) == refused
        assert not_recorded <= refused  # the rest never reached the backend
    finally:
        srv.cleanup()
