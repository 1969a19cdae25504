"""The application: built from settings, started and stopped by the ASGI lifespan.

``create_app(settings)`` opens the sessions (``Sessions.open``: the journal,
and the registry restored from it), and wires the metrics, the routes
(``routes``: sessions, samples, chat, the Anthropic messages, the generic
forward; service routes here), the
request guards and the start-up and shutdown work: the upstream client, the
embedded echo backend when no upstream is configured, and idle-TTL
housekeeping. Nothing starts until the server runs the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time

import orjson
from blacksheep import Application, Content, Request, Response

from rollout_sessions.config import Settings, load_settings
from rollout_sessions.echo.backend import EchoBackend, start_echo_backend
from rollout_sessions.echo.tokenized import TokenizedTemplate
from rollout_sessions.metrics import Metrics
from rollout_sessions.routes import chat, forward, messages
from rollout_sessions.routes import samples as export
from rollout_sessions.routes import sessions as sessions_api
from rollout_sessions.sessions.service import Sessions
from rollout_sessions.tito import tito_from_settings
from rollout_sessions.upstream.client import Upstream
from rollout_sessions.upstream.controls import InFlight, Overrides
from rollout_sessions.web import errors, openapi
from rollout_sessions.web.endpoints import (
    JSON_TYPE,
    Guard,
    endpoint,
    error_response,
    raw_json_response,
)
from rollout_sessions.web.errors import ApiError
from rollout_sessions.web.routing import SessionRouter
from rollout_sessions.web.state import AppState

log = logging.getLogger("rollout_sessions")

# Idle-TTL housekeeping: one tick per second at most, each tick evicts in
# batches of EXPIRE_BUDGET and yields to the event loop between batches, so
# eviction never stalls request handling and never scans the whole table.
EXPIRE_BUDGET = 1024
EXPIRE_MAX_BATCHES_PER_TICK = 64
YOUNG_OVERWRITE_WARN_INTERVAL_S = 10.0


def app_from_env() -> Application:
    """App factory for any ASGI server: settings from ``ROLLOUT_SESSIONS_*`` only.

    E.g. ``uvicorn --factory rollout_sessions.web.app:app_from_env``.
    """
    return create_app(load_settings(environ=os.environ))


def create_app(settings: Settings, echo_port: int | None = None) -> Application:
    """Build the app. With no upstream configured, its start-up starts the
    embedded echo backend on ``echo_port`` (any free port if None) and
    forwards to it."""
    sessions = Sessions.open(settings, InFlight() if settings.cancel_on_delete else None)
    metrics = Metrics(sessions.registry.stats, settings.retry_window_s)
    state = AppState(
        settings=settings,
        sessions=sessions,
        upstream=None,  # type: ignore[arg-type]  # created on start (may need the echo URL)
        metrics=metrics,
        instance_id=secrets.token_hex(16),
        guard=Guard(settings.api_key),
        tito=tito_from_settings(
            settings.tokenizer,
            settings.tito_model,
            settings.chat_template,
            settings.chat_template_kwargs,
        ),
        overrides=(
            Overrides(settings.sampling_overrides, metrics) if settings.sampling_overrides else None
        ),
    )
    app = Application(router=SessionRouter(), show_error_details=False)
    app.state = state  # type: ignore[attr-defined]  # for tests and the CLI
    docs = openapi.install(app, state.guard)
    sessions_api.add_routes(app, docs, state)
    export.add_routes(app, docs, state)
    chat.add_routes(app, docs, state)
    forward.add_routes(app, docs, state, turns=messages.turn_routes())
    _add_service_routes(app, docs, state)
    _add_error_handlers(app, state)
    _add_lifecycle(app, state, echo_port)
    return app


# --- health, metrics, errors -------------------------------------------------


def _add_service_routes(app: Application, docs: openapi.OpenAPIHandler, state: AppState) -> None:
    health_body = orjson.dumps({"status": "ok", "session_server_instance_id": state.instance_id})
    metrics = state.metrics
    metrics_type = metrics.content_type.encode()

    journal = state.sessions.journal

    async def health(request: Request) -> Response:
        if journal is not None and journal.failure is not None:
            return Response(
                503,
                None,
                Content(
                    JSON_TYPE,
                    orjson.dumps(
                        {
                            "status": "unavailable",
                            "error": f"journal cannot write: {journal.failure}",
                            "session_server_instance_id": state.instance_id,
                        }
                    ),
                ),
            )
        return raw_json_response(health_body)

    async def metrics_route(request: Request) -> Response:
        return Response(200, None, Content(metrics_type, metrics.render()))

    async def not_found(request: Request) -> Response:
        raise errors.route_not_found(request.method, request.path)

    health_ep = openapi.document(
        docs,
        endpoint(state, "GET", "/health", health, public=True),
        summary="Liveness and instance id",
        description="`session_server_instance_id` changes on every start. 503 while the "
        "journal cannot commit anything (a full disk): `error` says why.",
        tags=["service"],
        responses={
            200: '`{"status": "ok", "session_server_instance_id": "<hex>"}`',
            503: '`{"status": "unavailable", "error": "journal cannot write: ...", ...}`',
        },
    )
    metrics_ep = openapi.document(
        docs,
        endpoint(state, "GET", "/metrics", metrics_route),
        summary="Prometheus metrics",
        tags=["service"],
        responses={200: "Prometheus text exposition"},
    )
    app.router.add_get("/health", health_ep)
    app.router.add_get("/metrics", metrics_ep)
    app.router.fallback = endpoint(state, "*", "unmatched", not_found)


def _add_error_handlers(app: Application, state: AppState) -> None:
    """Whatever escapes a route still answers ``{"error": ...}``."""
    count_error = state.metrics.responses.inc

    async def on_api_error(app_: Application, request: Request, exc: ApiError) -> Response:
        count_error(str(exc.status))
        return error_response(exc)

    async def on_http_error(app_: Application, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status", 500)
        if status >= 500:
            err = errors.internal_error()
        elif status == 404:
            err = errors.route_not_found(request.method, request.path)
        else:
            err = ApiError(status, str(exc) or "bad request")
        count_error(str(err.status))
        return error_response(err)

    app.exceptions_handlers[ApiError] = on_api_error
    for status in (400, 401, 403, 404, 405, 413, 500):
        app.exceptions_handlers[status] = on_http_error


# --- start and stop: upstream client, echo backend, housekeeping -------------


def _add_lifecycle(app: Application, state: AppState, echo_port: int | None) -> None:
    tasks: list[asyncio.Task[None]] = []
    echoes: list[EchoBackend] = []

    async def on_start(app_: Application) -> None:
        settings = state.settings
        if settings.upstream is None:
            tokenized = TokenizedTemplate(state.tito) if state.tito is not None else None
            echo = await start_echo_backend("127.0.0.1", echo_port or 0, tokenized=tokenized)
            echoes.append(echo)
            if echo_port is None:  # `serve` logged it already, as its first line
                log.warning("no upstream configured: using embedded echo backend at %s", echo.url)
            settings = state.settings = dataclasses.replace(settings, upstream=echo.url)
        upstream = Upstream(
            settings.upstream or "",
            timeout_s=settings.upstream_timeout_s,
            max_answer_bytes=settings.max_upstream_answer_bytes,
            api_key=settings.upstream_api_key,
            # The server's own key never leaves it.
            forward_client_auth=settings.api_key is None,
            routing_header=settings.upstream_routing_header,
        )
        await upstream.start()
        state.upstream = upstream
        if state.sessions.journal is not None:
            state.sessions.journal.start(asyncio.get_running_loop())
        tasks.append(asyncio.create_task(_housekeeping(state), name="rollout-sessions-ttl"))

    async def on_stop(app_: Application) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()
        if state.upstream is not None:
            await state.upstream.close()
        if state.sessions.journal is not None:
            await state.sessions.journal.close()
        for echo in echoes:
            await echo.close()
        echoes.clear()

    app.on_start += on_start
    app.on_stop += on_stop


async def _housekeeping(state: AppState) -> None:
    """Idle-TTL eviction in bounded batches, and the young-overwrite warning."""
    registry = state.sessions.registry
    settings = state.settings
    tick = min(1.0, settings.session_ttl_s / 4)
    last_young = registry.stats()["young_overwrites"]
    last_warn = float("-inf")
    while True:
        await asyncio.sleep(tick)
        try:
            for _ in range(EXPIRE_MAX_BATCHES_PER_TICK):
                if registry.expire(EXPIRE_BUDGET) < EXPIRE_BUDGET:
                    break
                await asyncio.sleep(0)  # let requests run between batches
            stats = registry.stats()
        except Exception:  # never let housekeeping die silently
            log.exception("idle-TTL housekeeping failed")
            continue
        young = stats["young_overwrites"]
        now = time.monotonic()
        if young > last_young and now - last_warn >= YOUNG_OVERWRITE_WARN_INTERVAL_S:
            log.warning(
                "tombstone capacity too small: %d deleted ids were forgotten less than "
                "%gs (the retry window) after their delete (%d in total; capacity %d, "
                "horizon %.1fs); stale retries at them would create ghost sessions. "
                "Raise ROLLOUT_SESSIONS_TOMBSTONE_CAPACITY / --tombstone-capacity "
                "(rule: peak delete rate x retry window).",
                young - last_young,
                settings.retry_window_s,
                young,
                stats["capacity"],
                stats["horizon_s"],
            )
            last_young = young
            last_warn = now
