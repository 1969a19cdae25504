"""SessionRouter's shortcut for ``/sessions/{id}`` matches exactly what BlackSheep's
stock router matches, for any path."""

from __future__ import annotations

from blacksheep import Request, Router
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rollout_sessions.web.routing import SessionRouter


async def get_session(request: Request) -> None: ...


async def delete_session(request: Request) -> None: ...


async def proxy(request: Request) -> None: ...


async def health(request: Request) -> None: ...


async def fallback(request: Request) -> None: ...


def routers() -> tuple[SessionRouter, Router]:
    ours = SessionRouter()
    ours.add_by_id("GET", get_session)
    ours.add_by_id("DELETE", delete_session)
    stock = Router()
    stock.add_get("/sessions/{id}", get_session)
    stock.add_delete("/sessions/{id}", delete_session)
    for router in (ours, stock):
        router.add_get("/health", health)
        for method in ("GET", "POST", "DELETE"):
            router.add(method, "/sessions/{id}/{path:path}", proxy)
        router.fallback = fallback
        router.apply_routes()
        router.sort_routes()
    return ours, stock


OURS, STOCK = routers()


def outcome(router: Router, method: str, path: bytes) -> tuple[object, object]:
    match = router.get_match(Request.incoming(method, path, b"", []))
    if match is None:
        return None, None
    return match.handler, match.values


PATH = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([b"/sessions/", b"/Sessions/", b"/sessions", b"/", b"/health"]),
    st.text("abAB09-_.~:/%2Ff", max_size=12).map(str.encode),
)


@settings(max_examples=600, deadline=None)
@given(method=st.sampled_from(["GET", "DELETE", "POST"]), path=PATH)
@example(method="GET", path=b"/sessions/abc")
@example(method="GET", path=b"/sessions/a%2Fb")
@example(method="DELETE", path=b"/sessions/abc/")
@example(method="GET", path=b"/sessions/")
@example(method="POST", path=b"/sessions/abc")
def test_same_match_as_the_stock_router(method: str, path: bytes) -> None:
    assert outcome(OURS, method, path) == outcome(STOCK, method, path)


def test_the_shortcut_is_taken_and_decodes_like_the_stock_route() -> None:
    assert outcome(OURS, "GET", b"/sessions/a%2Fb") == (get_session, {"id": "a/b"})
    assert outcome(OURS, "DELETE", b"/sessions/x") == (delete_session, {"id": "x"})
    assert outcome(OURS, "GET", b"/sessions/x/v1/models") == (
        proxy,
        {"id": "x", "path": "v1/models"},
    )
