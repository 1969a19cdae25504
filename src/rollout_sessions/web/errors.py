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


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized")


def malformed_request(detail: str) -> ApiError:
    """A request the HTTP server cannot parse (answered before any handler)."""
    return ApiError(400, f"malformed HTTP request: {detail}")


def missing_host() -> ApiError:
    return malformed_request("an HTTP/1.1 request needs a Host header")


def duplicate_host() -> ApiError:
    return malformed_request("more than one Host header")


def unsupported_transfer_encoding(value: str) -> ApiError:
    return ApiError(501, f"unsupported transfer-encoding: {value} (only chunked is accepted)")


def body_timeout(seconds: float) -> ApiError:
    return ApiError(408, f"request body not complete within {seconds:g} s")


def method_not_allowed(method: str, path: str, allowed: str) -> ApiError:
    return ApiError(405, f"method {method} not allowed for {path}; allowed: {allowed}")


def invalid_samples_request(detail: str) -> ApiError:
    return ApiError(400, f"invalid samples request: {detail}")


def journal_full() -> ApiError:
    return ApiError(
        507,
        "journal full: no space left in DATA_DIR (disk full or JOURNAL_MAX_BYTES reached); "
        "nothing was recorded",
    )


def journal_failed(detail: str) -> ApiError:
    return ApiError(503, f"journal write failed: {detail}; nothing was recorded")


def minting_unavailable(detail: str) -> ApiError:
    return ApiError(
        503,
        f"cannot mint a session id: its reservation cannot be written ({detail}); "
        "nothing was created",
    )


# --- chat turn and upstream calls ---


def invalid_chat_request(detail: str) -> ApiError:
    return ApiError(400, f"invalid chat request: {detail}")


def rollback_refused(discard: int, stored: int, requested: int) -> ApiError:
    return ApiError(
        400,
        f"rollback failed: discard_count={discard} exceeds max_assistant_rollback_steps=1 "
        f"(stored has {stored} messages, request has {requested} messages)",
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
        f"pretokenized prefix mismatch: stored {stored} tokens are not a prefix of "
        f"prompt_token_ids + completion_token_ids ({received} tokens), first mismatch at "
        f"index {first_diff}; the backend did not extend the stored trajectory, turn not recorded",
    )


def template_failed(detail: str) -> ApiError:
    return ApiError(400, f"chat template cannot render the messages: {detail}")


def render_not_append_only(index: int, role: object) -> ApiError:
    return ApiError(
        400,
        f"chat template render is not append-only at message {index} (role={role!r}): "
        f"rendering it after the stored trajectory changes what was rendered before it",
    )


def upstream_ignored_input_ids(sent: int, received: int, first_diff: int) -> ApiError:
    return ApiError(
        502,
        f"malformed backend answer: prompt_token_ids ({received} tokens) differ from the "
        f"input_ids sent ({sent} tokens) at index {first_diff}; the backend must generate "
        f"from input_ids",
    )


def upstream_prompt_short(received: int, stored: int) -> ApiError:
    return ApiError(
        502,
        f"malformed backend answer: prompt_token_ids ({received} tokens) stop short of the "
        f"stored checkpoint ({stored} tokens); a turn's prompt must contain the whole "
        f"trajectory before it, turn not recorded",
    )


def upstream_transport_error(detail: str) -> ApiError:
    return ApiError(502, f"backend transport error: {detail}")


def upstream_timeout(seconds: float) -> ApiError:
    return ApiError(504, f"backend timeout: no answer within {seconds:g} s")


def upstream_malformed(detail: str) -> ApiError:
    return ApiError(502, f"malformed backend answer: {detail}")


def upstream_too_large(limit: int) -> ApiError:
    return ApiError(502, f"malformed backend answer: larger than {limit} bytes")


def proxy_path_refused(path: str) -> ApiError:
    return ApiError(400, f"refused proxy path {path!r}: it would leave the upstream base")


def truncated_not_extendable(node: int) -> ApiError:
    return ApiError(
        409,
        f"truncated generation cannot be extended: node {node} ended with "
        f"finish_reason=length; retry from an earlier point or start again",
    )


def tree_node_cap(cap: int, nodes: int, asked: int) -> ApiError:
    return ApiError(
        409,
        f"tree node cap reached: MAX_TREE_NODES={cap} (the session has {nodes} nodes, "
        f"the turn would add {asked}); nothing was forwarded",
    )
