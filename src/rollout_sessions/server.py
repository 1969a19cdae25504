"""The BlackSheep application: session lifecycle routes, chat, proxy, health, metrics.

Hot-path notes: every handler takes only ``request`` and is annotated
``-> Response`` so BlackSheep calls it directly (no binders, no output
wrapper); no middleware is installed; each route is wrapped once in a small
closure that converts ``ApiError`` to ``{"error": ...}`` and records its
latency into a per-route histogram.
"""

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import orjson
from blacksheep import Application, Content, Request, Response, Router
from blacksheep.server.openapi.common import ParameterInfo, ParameterSource
from blacksheep.server.openapi.ui import SwaggerUIProvider
from blacksheep.server.openapi.v3 import OpenAPIHandler
from blacksheep.server.routing import Route, RouteMatch
from openapidocs.v3 import Info

from rollout_sessions import __version__, errors
from rollout_sessions.chat import chat_completions
from rollout_sessions.config import Settings, load_settings
from rollout_sessions.echo import start_echo_backend
from rollout_sessions.errors import ApiError
from rollout_sessions.http1 import in_task
from rollout_sessions.httputil import (
    error_response,
    id_checked,
    json_response,
    parse_json,
    raw_json_response,
    read_body,
)
from rollout_sessions.metrics import Metrics
from rollout_sessions.proxy import Upstream, forward
from rollout_sessions.registry import CREATED, DELETED, LIVE, NEVER_SEEN, Registry, validate_id
from rollout_sessions.session import Session, empty_snapshot
from rollout_sessions.state import AppState

log = logging.getLogger("rollout_sessions")

Handler = Callable[[Request], Awaitable[Response]]

# Idle-TTL housekeeping: one tick per second at most, each tick evicts in
# batches of EXPIRE_BUDGET and yields to the event loop between batches, so
# eviction never stalls request handling and never scans the whole table.
EXPIRE_BUDGET = 1024
EXPIRE_MAX_BATCHES_PER_TICK = 64
YOUNG_OVERWRITE_WARN_INTERVAL_S = 10.0

PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

# Young-generation threshold of the cyclic GC in a serving process (CPython's
# default: 700). A young collection runs after this many net allocations of
# tracked objects; whatever is alive then (every request in flight) is
# promoted, and promotions are what trigger full collections, which walk
# every live session (37-73 ms measured with 200k sessions live). At 700, 256
# clients in flight caused about one full collection per second; at 10,000
# a steady load causes none, and while sessions pile up a young collection
# still walks at most ~10k objects (generation 1 at most ~100k).
# benchmarks/RESULTS.md, "The 256-client p99 tail", has the measurements.
GC_GEN0_THRESHOLD = 10_000


def _timed(metrics: Metrics, method: str, template: str, handler: Handler) -> Handler:
    """Wrap a route handler: ApiError -> JSON error answer, latency -> histogram."""
    observe = metrics.route(method, template).observe
    count_error = metrics.responses.inc

    async def endpoint(request: Request) -> Response:
        start = perf_counter()
        try:
            return await handler(request)
        except ApiError as err:
            count_error(str(err.status))
            return error_response(err)
        finally:
            observe(perf_counter() - start)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


class SessionRouter(Router):
    """BlackSheep's router, with ``/sessions/{id}`` recognised by its shape first.

    The stock matcher tries a method's routes in turn, each a regex, behind
    an LRU cache keyed by path. Session ids are all different, so every
    GET/DELETE of a session missed the cache and walked up to eight regexes
    (a few µs, a tenth of such a request). A path that is ``/sessions/``
    plus one segment matches here exactly what the stock route would (its
    regex is ``[^/]+``; the match decodes the value the same way); every
    other path goes to the stock matcher.
    """

    PREFIX = b"/sessions/"
    ID_AT = len(PREFIX)

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[str, Route] = {}

    def add_by_id(self, method: str, handler: Handler) -> None:
        """Register ``handler`` for ``method /sessions/{id}``."""
        route = Route("/sessions/{id}", handler)
        self.add_route(method, route)
        self._by_id[method] = route

    def get_match(self, request: Request) -> RouteMatch | None:
        path = request._path
        if path.startswith(self.PREFIX):
            raw_id = path[self.ID_AT :]
            if raw_id and b"/" not in raw_id:
                route = self._by_id.get(request.method)
                if route is not None:
                    return RouteMatch(route, {"id": raw_id})
        return self.get_match_by_method_and_path(request.method, path)


class _SwaggerUI(SwaggerUIProvider):
    """Swagger UI answering 200 at ``/docs`` itself (stock: a 301 to ``/docs/``).

    Its spec URL is relative (``openapi.json``), which resolves to the
    registered ``/openapi.json`` from ``/docs`` and ``/docs/openapi.json``
    from ``/docs/``: both routes exist.
    """

    def get_ui_handler(self) -> Callable[[Request], Response]:
        async def swagger_ui(request: Request) -> Response:
            return Response(200, None, Content(b"text/html; charset=utf-8", self._ui_html))

        return swagger_ui


def _documented(docs: OpenAPIHandler, endpoint: Handler, **info: Any) -> Handler:
    docs(**info)(endpoint)
    # BlackSheep documents `parameters` only for handlers that carry binders;
    # ours take the bare request, so declare an empty binder list.
    endpoint.binders = []  # type: ignore[attr-defined]
    return endpoint


def _checked_id(request: Request) -> str:
    sid = request.route_values["id"]
    id_checked(validate_id, sid)
    return sid


def app_for_serving(settings: Settings, echo_port: int | None = None) -> Application:
    """The app as ``rollout-sessions serve`` runs it: settled GC once started."""
    app = create_app(settings, echo_port=echo_port)
    app.on_start += _settle_gc
    return app


async def _settle_gc(app: Application) -> None:
    """Once the serving process has started: freeze its start-up heap, raise gen0.

    The ~55k objects of start-up (modules, app, routes, OpenAPI docs) never
    become garbage; frozen, no full collection walks them again (each walk
    cost ~40 ms, the fattest part of the lifecycle p99 at 256 clients).
    Frozen objects are still freed by reference counting. Process-wide, so
    only the server entry points call this, never ``create_app``.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def app_from_env() -> Application:
    """App factory for any ASGI server: settings from ROLLOUT_SESSIONS_* only.

    E.g. ``uvicorn --factory rollout_sessions.server:app_from_env``.
    """
    return app_for_serving(load_settings(environ=os.environ))


def create_app(settings: Settings, echo_port: int | None = None) -> Application:
    """Build the app. Nothing starts until the ASGI lifespan starts it.

    With no upstream configured, the app's start-up starts the embedded echo
    backend on ``echo_port`` (any free port if None) and forwards to it.
    """
    registry = Registry(
        shards=settings.shards,
        tombstone_capacity=settings.tombstone_capacity,
        retry_window=settings.retry_window_s,
        ttl=settings.session_ttl_s,
    )
    metrics = Metrics(registry.stats, settings.retry_window_s)
    state = AppState(
        settings=settings,
        registry=registry,
        upstream=None,  # type: ignore[arg-type]  # created on start (needs the echo URL)
        metrics=metrics,
        instance_id=secrets.token_hex(16),
    )

    app = Application(router=SessionRouter(), show_error_details=False)
    app.state = state  # type: ignore[attr-defined]  # for tests and the CLI
    docs = OpenAPIHandler(
        info=Info(
            title="rollout-sessions",
            version=__version__,
            description="Session server for agentic RL rollouts.",
        )
    )
    docs.ui_providers[:] = [_SwaggerUI("/docs")]
    docs.bind_app(app)

    _add_lifecycle_routes(app, docs, state)
    _add_chat_routes(app, docs, state)
    _add_service_routes(app, docs, state)
    _add_error_handlers(app, state)
    _add_lifecycle_events(app, state, echo_port)
    return app


# --- session lifecycle -----------------------------------------------------

_ID_PARAM = {"id": ParameterInfo("Session id", str, ParameterSource.PATH, True)}


def _add_lifecycle_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    registry = state.registry
    mint = registry.mint
    create = registry.create
    lookup = registry.lookup
    remove = registry.remove
    limit = state.settings.max_body_bytes

    async def create_session(request: Request) -> Response:
        body = await read_body(request, limit)
        sid = None
        if body:
            data = parse_json(body)
            if not isinstance(data, dict):
                raise errors.bad_json("expected a JSON object")
            sid = data.get("session_id")
        if sid is None:
            # Minted ids are 32 hex digits: no escaping needed.
            return raw_json_response(b'{"session_id":"%s"}' % mint(Session()).encode())
        outcome = id_checked(create, sid, Session())
        if outcome == CREATED:
            return json_response({"session_id": sid})
        if outcome == LIVE:
            raise errors.session_exists(sid)
        raise errors.session_not_found(sid)

    async def get_session(request: Request) -> Response:
        sid = request.route_values["id"]
        session = id_checked(lookup, sid)
        if session is NEVER_SEEN:
            # Restart tolerance: a never-seen id reads as empty, and stays unknown.
            return json_response(empty_snapshot(sid))
        if session is DELETED:
            raise errors.session_not_found(sid)
        return json_response(session.snapshot(sid))

    async def delete_session(request: Request) -> Response:
        sid = request.route_values["id"]
        session = id_checked(lookup, sid)
        if session is NEVER_SEEN or session is DELETED or session.closing:
            raise errors.session_not_found(sid)
        # From here a chat turn sees `closing` and answers 404.
        session.closing = True
        # Wait for a turn inside a locked step (never for an upstream call).
        # A session that never chatted has no lock: don't create one just to
        # delete it (idle sessions stay allocation-free).
        lock = session._lock
        if lock is not None:
            async with lock:
                remove(sid, expected=session)
        else:
            remove(sid, expected=session)
        return Response(204)

    m = state.metrics
    create_ep = _timed(m, "POST", "/sessions", create_session)
    get_ep = _timed(m, "GET", "/sessions/{id}", get_session)
    delete_ep = _timed(m, "DELETE", "/sessions/{id}", delete_session)
    _documented(
        docs,
        create_ep,
        summary="Create a session",
        description="Mint a new id, or create under the id of an optional body "
        '`{"session_id": "<id>"}`.',
        tags=["sessions"],
        responses={
            200: '`{"session_id": "<id>"}`',
            400: "invalid id or malformed JSON",
            404: "the id was deleted",
            409: "the id is live",
            413: "body too large",
        },
    )
    _documented(
        docs,
        get_ep,
        summary="Read a session's trajectory",
        tags=["sessions"],
        parameters=_ID_PARAM,
        responses={
            200: '`{"session_id", "records", "metadata"}`; a never-seen id reads empty',
            400: "invalid id",
            404: "the id was deleted",
        },
    )
    _documented(
        docs,
        delete_ep,
        summary="Delete a session",
        description="The id never comes back: later chat, GET and DELETE of it answer 404.",
        tags=["sessions"],
        parameters=_ID_PARAM,
        responses={204: "deleted", 400: "invalid id", 404: "unknown, deleted or closing"},
    )
    app.router.add_post("/sessions", create_ep)
    router: SessionRouter = app.router  # type: ignore[assignment]
    router.add_by_id("GET", get_ep)
    router.add_by_id("DELETE", delete_ep)


# --- chat and generic proxy ------------------------------------------------


def _add_chat_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:

    async def chat(request: Request) -> Response:
        # chat_completions validates the id with its lookup.
        return await chat_completions(state, request.route_values["id"], request)

    async def proxy(request: Request) -> Response:
        sid = _checked_id(request)
        # aiohttp's timeouts need a task; the first step of a handler has none.
        return await in_task(forward(state, sid, request.route_values.get("path") or "", request))

    m = state.metrics
    chat_ep = _timed(m, "POST", "/sessions/{id}/v1/chat/completions", chat)
    _documented(
        docs,
        chat_ep,
        summary="Chat turn through a session",
        description="Forwarded to the upstream and recorded in the trajectory. A never-seen "
        "id is auto-created; a deleted or closing one answers 404.",
        tags=["chat"],
        parameters=_ID_PARAM,
        responses={
            200: "the upstream answer (JSON, or SSE when `stream: true`)",
            400: "invalid id, malformed JSON or a trajectory that does not extend the session",
            404: "deleted or closing",
            413: "body too large",
            502: "backend transport error or malformed backend answer",
            504: "backend timeout",
        },
    )
    app.router.add_post("/sessions/{id}/v1/chat/completions", chat_ep)

    params = {
        **_ID_PARAM,
        "path": ParameterInfo("Path below the upstream base", str, ParameterSource.PATH, True),
    }
    for method in PROXY_METHODS:
        ep = _timed(m, method, "/sessions/{id}/{path}", proxy)
        _documented(
            docs,
            ep,
            summary="Forward to the upstream",
            description="Forwarded to `{upstream}/{path}`; no session state is touched.",
            tags=["proxy"],
            parameters=params,
            responses={400: "invalid id or a path leaving the upstream base"},
        )
        app.router.add(method, "/sessions/{id}/{path:path}", ep)


# --- health, metrics, errors -----------------------------------------------


def _add_service_routes(app: Application, docs: OpenAPIHandler, state: AppState) -> None:
    health_body = orjson.dumps({"status": "ok", "session_server_instance_id": state.instance_id})
    metrics = state.metrics
    metrics_type = metrics.content_type.encode()

    async def health(request: Request) -> Response:
        return raw_json_response(health_body)

    async def metrics_route(request: Request) -> Response:
        return Response(200, None, Content(metrics_type, metrics.render()))

    async def not_found(request: Request) -> Response:
        raise errors.route_not_found(request.method, request.path)

    health_ep = _timed(metrics, "GET", "/health", health)
    metrics_ep = _timed(metrics, "GET", "/metrics", metrics_route)
    _documented(
        docs,
        health_ep,
        summary="Liveness and instance id",
        description="`session_server_instance_id` changes on every start.",
        tags=["service"],
        responses={200: '`{"status": "ok", "session_server_instance_id": "<hex>"}`'},
    )
    _documented(
        docs,
        metrics_ep,
        summary="Prometheus metrics",
        tags=["service"],
        responses={200: "Prometheus text exposition"},
    )
    app.router.add_get("/health", health_ep)
    app.router.add_get("/metrics", metrics_ep)
    app.router.fallback = _timed(metrics, "*", "unmatched", not_found)


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


# --- lifecycle: upstream client, echo backend, housekeeping ----------------


def _add_lifecycle_events(app: Application, state: AppState, echo_port: int | None) -> None:
    tasks: list[asyncio.Task[None]] = []
    echo_holder: list[object] = []

    async def on_start(app_: Application) -> None:
        settings = state.settings
        if settings.upstream is None:
            echo = await start_echo_backend("127.0.0.1", echo_port or 0)
            echo_holder.append(echo)
            if echo_port is None:  # `serve` logged it already, as its first line
                log.warning("no upstream configured: using embedded echo backend at %s", echo.url)
            settings = state.settings = dataclasses.replace(settings, upstream=echo.url)
        upstream = Upstream(settings)
        await upstream.start()
        state.upstream = upstream
        tasks.append(asyncio.create_task(_housekeeping(state), name="rollout-sessions-ttl"))

    async def on_stop(app_: Application) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()
        if state.upstream is not None:
            await state.upstream.close()
        for echo in echo_holder:
            await echo.close()  # type: ignore[attr-defined]
        echo_holder.clear()

    app.on_start += on_start
    app.on_stop += on_stop


async def _housekeeping(state: AppState) -> None:
    """Idle-TTL eviction in bounded batches, and the young-overwrite warning."""
    registry = state.registry
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
