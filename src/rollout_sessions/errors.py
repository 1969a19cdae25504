"""Every error the HTTP layer answers, built in one place.

Handlers raise ``ApiError``; the server turns it into ``{"error": message}``
with the status. Message builders live here so each text exists once.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}``."""

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, f"session not found: session_id={session_id}")


def session_exists(session_id: str) -> ApiError:
    return ApiError(409, f"session already exists: session_id={session_id}")


def invalid_session_id(reason: str) -> ApiError:
    return ApiError(400, reason)


def bad_json(detail: str) -> ApiError:
    return ApiError(400, f"invalid JSON body: {detail}")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds {limit} bytes")


def route_not_found(method: str, path: str) -> ApiError:
    return ApiError(404, f"not found: {method} {path}")
