"""Rollout controls: pinned sampling, sticky backend routing, abort on delete.

- ``SAMPLING_OVERRIDES``: a JSON object set on every forwarded turn, over
  the client's values (``apply_overrides``), so an agent cannot move its
  rollouts off the policy being trained. Keys the trajectory itself depends
  on (``RESERVED_KEYS``) are refused at start-up.
- ``UPSTREAM_ROUTING_HEADER``: the header that carries the session id on
  every upstream call made for a session (``Upstream.headers``), so a
  routing gateway keeps a session on one worker and its prefix cache warm.
- ``CANCEL_ON_DELETE``: ``InFlight`` knows which request tasks of a session
  are waiting for the backend; ``DELETE`` cancels them. aiohttp closes a
  connection whose request was cancelled instead of pooling it, and the
  backend (SGLang, vLLM) aborts a request whose client went away.

Why cancel the request's own task: the turn already runs in one, so
tracking it costs a dict entry while the call is in flight, with no extra
task per turn and nothing allocated for an idle session.
"""

from __future__ import annotations

import re
from asyncio import Task, current_task
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout_sessions.metrics import Metrics

DEFAULT_ROUTING_HEADER = "X-SMG-Routing-Key"

# Keys an override may not set: the trajectory needs them as the server
# sets them (forced flags), or they are the turn itself.
RESERVED_KEYS = frozenset(
    {
        "messages",
        "tools",
        "input_ids",
        "stream",
        "stream_options",
        "logprobs",
        "return_prompt_token_ids",
        "return_meta_info",
        "no_stop_trim",
    }
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP field name (RFC 9110)
# Headers the HTTP client sets itself, or credentials: never a routing key.
_NOT_A_ROUTING_HEADER = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "content-encoding",
        "host",
        "expect",
        "authorization",
        "accept",
        "accept-encoding",
    }
)


def parse_overrides(raw: str) -> dict[str, Any]:
    """``SAMPLING_OVERRIDES``: a JSON object without reserved keys; ValueError if not."""
    import json

    text = raw.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"must be a JSON object, got {raw!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {raw!r}")
    reserved = sorted(RESERVED_KEYS.intersection(value))
    if reserved:
        raise ValueError(
            f"cannot set {', '.join(reserved)}: the server sets these for the trajectory"
        )
    if not isinstance(value.get("chat_template_kwargs", {}), dict):
        raise ValueError("chat_template_kwargs must be a JSON object")
    return value


def parse_routing_header(raw: str) -> str | None:
    """``UPSTREAM_ROUTING_HEADER``: a header name, or ``none`` (off); ValueError if not."""
    value = raw.strip()
    if value.lower() == "none":
        return None
    if not _TOKEN.match(value):
        raise ValueError(f"must be an HTTP header name or none, got {raw!r}")
    if value.lower() in _NOT_A_ROUTING_HEADER:
        raise ValueError(f"must not be a header the server sets itself, got {raw!r}")
    return value


class Overrides:
    """``SAMPLING_OVERRIDES`` and their counters, applied to each turn's body."""

    __slots__ = ("values", "_items", "_applied", "_replaced")

    def __init__(self, values: dict[str, Any], metrics: Metrics) -> None:
        self.values = values
        self._items = tuple(values.items())
        self._applied = metrics.sampling_overrides
        self._replaced = metrics.sampling_overrides_replaced

    def apply(self, req: dict[str, Any]) -> None:
        """Set every override on ``req`` (a parsed chat body), counting those
        that replaced a different value the client sent."""
        get = req.get
        for key, value in self._items:
            sent = get(key, _ABSENT)
            if sent is not _ABSENT and sent != value:
                self._replaced.inc(key)
            req[key] = value
            self._applied.inc(key)


_ABSENT: Any = object()


class InFlight:
    """The request tasks of each session that are waiting for the backend.

    A session with one call in flight holds its task, with several a set of
    them; a session with none has no entry. ``cancel`` removes the entry and
    cancels its tasks, so a task that finds itself gone in ``leave`` knows a
    DELETE cancelled it (and not, say, the server shutting down).
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[object, Task[Any] | set[Task[Any]]] = {}

    def enter(self, session: object) -> Task[Any]:
        task = current_task()
        assert task is not None
        calls = self._calls
        held = calls.get(session)
        if held is None:
            calls[session] = task
        elif type(held) is set:
            held.add(task)
        else:
            calls[session] = {held, task}  # type: ignore[arg-type]
        return task

    def leave(self, session: object, task: Task[Any]) -> bool:
        """Forget ``task``; False if a DELETE cancelled it (then it was forgotten already)."""
        calls = self._calls
        held = calls.get(session)
        if held is task:
            del calls[session]
            return True
        if type(held) is set and task in held:
            held.remove(task)
            if not held:
                del calls[session]
            return True
        return False

    def cancel(self, session: object) -> int:
        """Cancel every call in flight for ``session``; how many there were."""
        held = self._calls.pop(session, None)
        if held is None:
            return 0
        tasks = held if type(held) is set else (held,)
        for task in tasks:
            task.cancel()
        return len(tasks)

    def __len__(self) -> int:
        return len(self._calls)
