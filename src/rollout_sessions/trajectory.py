"""The linear trajectory rules of a session, as pure functions over ``Session``.

A session keeps the messages of its last recorded turn (request messages plus
the assistant answer), one token checkpoint per assistant turn
(``prompt_token_ids + completion ids`` of that turn) and one record per turn.
Checkpoints and records always have the same length: ``num_assistant``.

A new request is accepted when its messages

- extend the stored messages (the stored list is a prefix of the request), or
- retry at most one assistant step back: they agree with the stored messages
  up to some assistant turn k and then diverge (or stop), and at most one
  assistant turn lies after k. Accepting such a request *plans* a rollback to
  k checkpoints; the truncation itself happens when the new turn is recorded,
  so a failed or lost upstream call leaves the trajectory as it was. Rolling
  back the only assistant turn starts the trajectory over (k = 0).

Roles: before the first assistant turn (a fresh session, a session restarted
by auto-create, or a rollback to k = 0) any roles are accepted: that is the
prompt. Messages after the last retained assistant must have a role in
``ALLOWED_APPEND_ROLES`` (default ``tool``), as in the production server: a
trajectory is one prompt followed by assistant/tool steps, and operators opt
in to more (``tool,system`` or ``tool,user`` for multi-user-turn chats).

Messages are compared on what a chat template renders: role, content,
reasoning_content and tool_calls (without the wire-only ``index``), with
``None``, ``""`` and ``[]`` treated alike, so a client that re-serialises the
assistant message (``content: null`` vs ``""``, extra SDK fields) still
extends its trajectory.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Any

from rollout_sessions import errors
from rollout_sessions.session import Session

MAX_ROLLBACK_STEPS = 1

_RENDERED_KEYS = ("role", "content", "reasoning_content", "tool_calls")


def _norm(value: Any) -> Any:
    if value is None or value == "" or value == []:
        return None
    return value


def _norm_tool_calls(value: Any) -> Any:
    value = _norm(value)
    if type(value) is not list:
        return value
    return [
        {k: v for k, v in call.items() if k != "index"} if type(call) is dict else call
        for call in value
    ]


def messages_match(stored: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two messages render the same (see the module docstring)."""
    if stored == new:
        return True
    for key in _RENDERED_KEYS:
        a = stored.get(key)
        b = new.get(key)
        if a == b:
            continue
        if key == "tool_calls":
            if _norm_tool_calls(a) != _norm_tool_calls(b):
                return False
        elif _norm(a) != _norm(b):
            return False
    return True


def plan_turn(
    session: Session, messages: list[dict[str, Any]], allowed_roles: tuple[str, ...]
) -> int:
    """How many checkpoints the turn builds on; ``ApiError`` 400 if it is refused.

    Pure: reads the session, changes nothing. Call under ``session.lock``.
    """
    stored = session.messages
    if not stored:
        return 0
    n_stored = len(stored)
    num_assistant = session.num_assistant
    limit = min(n_stored, len(messages))
    match = 0
    while match < limit and messages_match(stored[match], messages[match]):
        match += 1
    if match == n_stored:
        keep = num_assistant
        tail_start = n_stored
    else:
        # Diverges (or stops) inside the stored messages: roll back to the last
        # generated assistant turn that is still shared. Assistant messages the
        # client wrote itself (few-shot examples) are not turns.
        ends = session.ends or []
        keep = bisect_right(ends, match)
        tail_start = ends[keep - 1] if keep else 0
        discard = num_assistant - keep
        if discard > MAX_ROLLBACK_STEPS:
            raise errors.rollback_refused(discard, n_stored, len(messages))
    if keep:
        for i in range(tail_start, len(messages)):
            role = messages[i].get("role")
            if role not in allowed_roles:
                raise errors.append_role_refused(i, role, allowed_roles)
    return keep


def unchanged_since(session: Session, expected_n: int, expected_last: array | None) -> bool:
    """True if no turn was recorded (and nothing rolled back) since the plan.

    Every recorded turn appends a new checkpoint object, so the pair (count,
    identity of the last checkpoint) changes with every commit, rollbacks
    included.
    """
    checkpoints = session.checkpoints
    if not checkpoints:
        return expected_n == 0
    return len(checkpoints) == expected_n and checkpoints[-1] is expected_last


def check_prefix(session: Session, keep: int, tokens: array) -> None:
    """``ApiError`` 500 unless checkpoint ``keep`` is a prefix of ``tokens``."""
    if not keep:
        return
    base = session.checkpoints[keep - 1]  # type: ignore[index]
    n = len(base)
    if len(tokens) >= n and tokens[:n] == base:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(base, tokens, strict=False)) if a != b),
        min(n, len(tokens)),
    )
    raise errors.checkpoint_mismatch(n, len(tokens), first)


def commit_turn(
    session: Session,
    keep: int,
    messages: list[dict[str, Any]],
    assistant: dict[str, Any],
    tokens: array,
    record: dict[str, Any],
) -> None:
    """Record a turn on top of checkpoint ``keep`` (rolling back what lies after)."""
    checkpoints = session.checkpoints
    records = session.records
    ends = session.ends
    if checkpoints is None or records is None or ends is None:
        checkpoints = session.checkpoints = []
        records = session.records = []
        ends = session.ends = []
    elif keep < len(checkpoints):
        del checkpoints[keep:]
        del records[keep:]
        del ends[keep:]
    checkpoints.append(tokens)
    records.append(record)
    ends.append(len(messages) + 1)  # just after this turn's assistant message
    stored = list(messages)
    stored.append(assistant)
    session.messages = stored
