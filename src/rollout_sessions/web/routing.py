"""Route shapes: ``/sessions/{id}`` matched by shape, and the turn sub-paths.

BlackSheep's stock router tries a method's routes in turn, each a regex,
behind an LRU cache keyed by path. Session ids are all different, so every
GET/DELETE of a session would miss that cache and walk the regexes.
``SessionRouter`` recognises ``/sessions/`` plus one segment first and
asks that one route to match (its public ``Route.match_by_path``: one regex,
no cache); every other path goes to the stock matcher. It overrides
``Router.get_match``, the call BlackSheep's application routes each request
with (docs/internals.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from blacksheep import Request, Response, Router
from blacksheep.server.routing import Route, RouteMatch

from rollout_sessions.web._blacksheep import raw_path

Handler = Callable[[Request], Awaitable[Response]]

# The chat route below a session, and the same path as an upstream sub-path.
CHAT_SUBPATH = "v1/chat/completions"
CHAT_PATH = "/" + CHAT_SUBPATH
# The Anthropic Messages routes below a session (messages.py): turns too,
# never forwarded as they are.
MESSAGES_SUBPATH = "v1/messages"
COUNT_TOKENS_SUBPATH = "v1/messages/count_tokens"
SESSION_PREFIX = b"/sessions/"
FALLBACK_PATTERN = b"*"  # the pattern of BlackSheep's fallback route


class SessionRouter(Router):
    """BlackSheep's router, with ``/sessions/{id}`` recognised by its shape first."""

    ID_AT = len(SESSION_PREFIX)

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[str, Route] = {}

    def add_by_id(self, method: str, handler: Handler) -> None:
        """Register ``handler`` for ``method /sessions/{id}``."""
        route = Route("/sessions/{id}", handler)
        self.add_route(method, route)
        self._by_id[method] = route

    def get_match(self, request: Request) -> RouteMatch | None:
        method = request.method
        match = self._match(method, raw_path(request))
        if method == "HEAD" and (match is None or match.pattern == FALLBACK_PATTERN):
            # HEAD answers wherever GET does (the HTTP server sends no body).
            match = self._match("GET", raw_path(request))
        return match

    def _match(self, method: str, path: bytes) -> RouteMatch | None:
        if path.startswith(SESSION_PREFIX):
            raw_id = path[self.ID_AT :]
            if raw_id and b"/" not in raw_id:
                route = self._by_id.get(method)
                match = route.match_by_path(path) if route is not None else None
                if match is not None:
                    return match
        return self.get_match_by_method_and_path(method, path)


def raw_subpath(request: Request) -> str:
    """What follows ``/sessions/{id}/`` in the target, exactly as the client encoded it."""
    path = raw_path(request)
    end = path.find(b"/", len(SESSION_PREFIX))
    return path[end + 1 :].decode("latin-1")
