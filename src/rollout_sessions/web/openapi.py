"""The OpenAPI description (``/openapi.json``) and its Swagger UI (``/docs``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.server.openapi.common import ParameterInfo, ParameterSource
from blacksheep.server.openapi.ui import SwaggerUIProvider, UIOptions
from blacksheep.server.openapi.v3 import OpenAPIHandler
from openapidocs.v3 import Info

from rollout_sessions import __version__
from rollout_sessions.web._blacksheep import all_routes, document_without_binders
from rollout_sessions.web.endpoints import Guard

ID_PARAM = {"id": ParameterInfo("Session id", str, ParameterSource.PATH, True)}
PATH_PARAM = {
    "path": ParameterInfo("Path below the upstream base", str, ParameterSource.PATH, True)
}


class _SwaggerUI(SwaggerUIProvider):
    """Swagger UI answering 200 at ``/docs`` itself (stock: a 301 to ``/docs/``).

    Its spec URL is relative (``openapi.json``), which resolves to the
    registered ``/openapi.json`` from ``/docs`` and ``/docs/openapi.json``
    from ``/docs/``: both routes exist.
    """

    page = b""

    def build_ui(self, options: UIOptions) -> None:
        self.page = self.get_openapi_ui_html(options).encode()

    def get_ui_handler(self) -> Callable[[Request], Any]:
        async def swagger_ui(request: Request) -> Response:
            return Response(200, None, Content(b"text/html; charset=utf-8", self.page))

        return swagger_ui


def install(app: Application, guard: Guard) -> OpenAPIHandler:
    """Serve the description and the UI for ``app``, behind ``guard``; returns the
    handler to document routes with."""
    docs = OpenAPIHandler(
        info=Info(
            title="rollout-sessions",
            version=__version__,
            description="Session server for agentic RL rollouts.",
        )
    )
    docs.ui_providers[:] = [_SwaggerUI("/docs")]
    docs.bind_app(app)
    # bind_app has just registered the documentation routes, the only ones so far.
    for route in all_routes(app.router):
        route.handler = docs.ignore()(guard.wrap(route.handler))
    return docs


def document(docs: OpenAPIHandler, endpoint: Any, **info: Any) -> Any:
    """Describe ``endpoint`` (summary, parameters, responses, ...); returns it."""
    docs(**info)(endpoint)
    document_without_binders(endpoint)
    return endpoint
