"""The linear trajectory rules of a session, as pure functions over its store.

The store (``trajectory.store.Trajectory``) keeps the messages of the last
recorded turn (request messages plus the assistant answer), and per turn
where its checkpoint (``prompt_token_ids + completion ids`` of that turn)
ends in the one token buffer they share, and its record: ``num_assistant``
turns.

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

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web import errors

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


@dataclass(slots=True)
class Plan:
    """How a request relates to the stored trajectory (``plan_turn``)."""

    keep: int  # turns it builds on (fewer than stored: a planned rollback)
    tail_start: int  # its first message after the kept trajectory
    exact: int  # stored messages it repeats byte for byte
    version: int  # the store's version it was planned on


def plan_turn(
    traj: Trajectory | None,
    messages: list[dict[str, Any]],
    message_bytes: list[bytes],
    allowed_roles: tuple[str, ...],
) -> Plan:
    """How the turn builds on the stored trajectory; ``ApiError`` 400 if it is refused.

    Pure: reads the store, changes nothing. Call under the session lock.
    """
    if traj is None or not traj.messages:
        return Plan(0, 0, 0, traj.version if traj is not None else 0)
    stored = traj.messages
    n_stored = len(stored)
    num_turns = traj.num_turns
    limit = min(n_stored, len(messages))
    exact = 0
    while exact < limit and stored[exact] == message_bytes[exact]:
        exact += 1
    match = exact
    while match < limit and messages_match(traj.message(match), messages[match]):
        match += 1
    if match == n_stored:
        keep = num_turns
        tail_start = n_stored
    else:
        # Diverges (or stops) inside the stored messages: roll back to the last
        # generated assistant turn that is still shared. Assistant messages the
        # client wrote itself (few-shot examples) are not turns.
        ends = [traj.message_end(k) for k in range(num_turns)]
        keep = bisect_right(ends, match)
        tail_start = ends[keep - 1] if keep else 0
        discard = num_turns - keep
        if discard > MAX_ROLLBACK_STEPS:
            raise errors.rollback_refused(discard, n_stored, len(messages))
    if keep:
        for i in range(tail_start, len(messages)):
            role = messages[i].get("role")
            if role not in allowed_roles:
                raise errors.append_role_refused(i, role, allowed_roles)
    return Plan(keep, tail_start, exact, traj.version)
