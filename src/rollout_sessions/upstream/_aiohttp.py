"""The one place that reaches into aiohttp's internals (tested in tests/unit/test_adapters.py).

aiohttp's pool hands an idle keep-alive connection to the next request as
long as its socket is open. If the backend wrote an answer nobody asked for
onto that idle connection (a bug, or a stale answer after a retry), aiohttp
has already parsed and queued it, and the next request, a turn of another
session, would receive it as its own answer. ``StrictResponseHandler``
closes a connection the moment bytes arrive while no request of ours is
waiting on it, so that connection is never reused.

Internals used: ``ResponseHandler.set_response_params`` (called by aiohttp
once per request, before it is sent), ``ResponseHandler.feed_data`` (called
once per parsed answer with its body stream, interim 1xx answers included:
``ClientResponse`` skips those itself), ``data_received``, ``force_close``
and ``BaseConnector._factory``
(the protocol factory of the pool). aiohttp is pinned to one minor version
(docs/internals.md).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler


def is_interim(status: int) -> bool:
    """An interim answer, which a final answer follows (101 ends HTTP instead)."""
    return 100 <= status < 200 and status != 101


class StrictResponseHandler(ResponseHandler):
    """A pooled connection that refuses bytes nobody asked for."""

    _awaiting = False  # a request was sent and its answer is not complete yet
    _answer: Any = None  # body stream of the answer to that request, once parsed

    def set_response_params(self, **kwargs: Any) -> None:
        self._awaiting = True
        self._answer = None
        super().set_response_params(**kwargs)

    def feed_data(self, data: Any, size: int = 0) -> None:
        # Called once per parsed answer with (message, body stream), interim
        # (1xx) answers included: aiohttp's ClientResponse.start skips those
        # and waits for the next. Their empty body must not count as the
        # answer's end, or the final answer would arrive "unasked" and close
        # the connection.
        if self._answer is None and not is_interim(data[0].code):
            self._answer = data[1]
        super().feed_data(data, size)

    def data_received(self, data: bytes) -> None:
        # aiohttp itself calls this with b"" to resume a paused body.
        if data and not self._awaiting:
            # Idle in the pool: whatever this is, it answers no request of ours.
            self.force_close()
            if self.transport is not None:
                self.transport.close()
            return
        super().data_received(data)
        answer = self._answer
        if answer is not None and answer.is_eof():
            self._awaiting = False  # complete: any further byte is unsolicited


def strict_connector(
    handler: type[StrictResponseHandler] = StrictResponseHandler, **kwargs: Any
) -> aiohttp.TCPConnector:
    """An ``aiohttp.TCPConnector`` whose connections are ``handler``s."""
    connector = aiohttp.TCPConnector(**kwargs)
    factory = connector._factory  # functools.partial(ResponseHandler, loop=loop)
    connector._factory = lambda: handler(*factory.args, **factory.keywords)
    return connector
