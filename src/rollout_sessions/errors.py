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


def client_disconnected() -> ApiError:
    # Nobody reads this answer; the status only shows in logs and metrics.
    return ApiError(400, "client disconnected before the request body was complete")


def internal_error() -> ApiError:
    return ApiError(500, "internal server error")


# --- chat turn and upstream proxy (chat worker) ---


def invalid_chat_request(detail: str) -> ApiError:
    return ApiError(400, f"invalid chat request: {detail}")


def rollback_refused(discard: int, diverge_at: int, stored: int, requested: int) -> ApiError:
    return ApiError(
        400,
        f"rollback failed: the request diverges from the stored trajectory at message "
        f"{diverge_at}, which would discard {discard} assistant turns (discard_count={discard}, "
        f"at most 1 may be retried); stored has {stored} messages, request has {requested}",
    )


def append_role_refused(index: int, role: object, allowed: tuple[str, ...]) -> ApiError:
    return ApiError(
        400,
        f"appended message at index {index} has role={role!r}, allowed={list(allowed)}; "
        f"roles after an assistant turn are set by ALLOWED_APPEND_ROLES",
    )


def checkpoint_mismatch(stored: int, received: int, first_diff: int) -> ApiError:
    return ApiError(
        500,
        f"token checkpoint mismatch: the stored {stored} tokens are not a prefix of "
        f"prompt_token_ids + completion ids ({received} tokens); first difference at index "
        f"{first_diff}; the backend did not reuse the stored trajectory, turn not recorded",
    )


def upstream_transport_error(detail: str) -> ApiError:
    return ApiError(502, f"backend transport error: {detail}")


def upstream_timeout(seconds: float) -> ApiError:
    return ApiError(504, f"backend timeout: no answer within {seconds:g} s")


def upstream_malformed(detail: str) -> ApiError:
    return ApiError(502, f"malformed backend answer: {detail}")


def proxy_path_refused(path: str) -> ApiError:
    return ApiError(400, f"refused proxy path {path!r}: it would leave the upstream base")


# --- HTTP framing (http1) ---


def malformed_request(detail: str) -> ApiError:
    return ApiError(400, f"malformed HTTP request: {detail}")


def headers_too_large(limit: int) -> ApiError:
    return ApiError(431, f"request headers exceed {limit} bytes")
