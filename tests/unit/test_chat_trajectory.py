"""Unit tests of the trajectory rules (no server): matching, extension, rollback, roles."""

from __future__ import annotations

import pytest

from rollout_sessions.errors import ApiError
from rollout_sessions.session import Session
from rollout_sessions.trajectory import (
    check_prefix,
    commit_turn,
    messages_match,
    plan_turn,
    unchanged_since,
)

TOOL = ("tool",)
SYS = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "q"}


def assistant(i: int) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": f"{{{i}}}"}}
        ],
    }


def tool(i: int, text: str = "ok") -> dict:
    return {"role": "tool", "tool_call_id": f"c{i}", "content": f"{text}-{i}"}


def record(i: int) -> dict:
    return {"turn": i}


def session_with_turns(n: int) -> tuple[Session, list[dict]]:
    """A session with n recorded turns: [SYS, USER, a0, t0, a1, t1, ..., a(n-1)]."""
    s = Session()
    msgs = [SYS, USER]
    tokens: list[int] = [1, 2]
    for i in range(n):
        keep = plan_turn(s, msgs, TOOL)
        tokens = tokens + [10 + i, 20 + i]
        commit_turn(s, keep, msgs, assistant(i), tokens, record(i))
        msgs = [*msgs, assistant(i), tool(i)]
    return s, s.messages


def test_first_turn_accepts_any_roles():
    s = Session()
    msgs = [SYS, USER, assistant(0), {"role": "user", "content": "again"}]
    assert plan_turn(s, msgs, TOOL) == 0


def test_extension_keeps_all_checkpoints():
    s, stored = session_with_turns(2)
    assert plan_turn(s, [*stored, tool(1)], TOOL) == 2
    assert plan_turn(s, list(stored), TOOL) == 2  # nothing appended


def test_append_role_limited_to_allowed():
    s, stored = session_with_turns(1)
    with pytest.raises(ApiError) as err:
        plan_turn(s, [*stored, {"role": "user", "content": "more"}], TOOL)
    assert err.value.status == 400
    assert "appended message at index 3 has role='user'" in err.value.message
    assert plan_turn(s, [*stored, {"role": "user", "content": "more"}], ("tool", "user")) == 1


def test_one_step_rollback_is_planned_not_applied():
    s, stored = session_with_turns(2)
    before = (list(s.messages), list(s.checkpoints), list(s.records))
    retry = [SYS, USER, assistant(0), tool(0, "different")]
    assert plan_turn(s, retry, TOOL) == 1
    assert (s.messages, s.checkpoints, s.records) == before  # unchanged until commit
    commit_turn(s, 1, retry, assistant(9), s.checkpoints[0] + [99], record(9))
    assert s.num_assistant == 2
    assert s.records == [record(0), record(9)]
    assert s.messages == [*retry, assistant(9)]


def test_same_turn_retry_is_a_one_step_rollback():
    s, stored = session_with_turns(2)
    assert plan_turn(s, [SYS, USER, assistant(0), tool(0)], TOOL) == 1


def test_two_step_rollback_refused():
    s, stored = session_with_turns(3)
    with pytest.raises(ApiError) as err:
        plan_turn(s, [SYS, USER, assistant(0), tool(0, "other")], TOOL)
    assert err.value.status == 400
    assert "rollback failed" in err.value.message
    assert "discard_count=2" in err.value.message


def test_rollback_of_the_only_turn_starts_over():
    s, _ = session_with_turns(1)
    assert plan_turn(s, [SYS, {"role": "user", "content": "other"}], TOOL) == 0
    s2, _ = session_with_turns(2)
    with pytest.raises(ApiError):
        plan_turn(s2, [SYS, {"role": "user", "content": "other"}], TOOL)


def test_rollback_tail_roles_checked():
    s, _ = session_with_turns(2)
    with pytest.raises(ApiError) as err:
        plan_turn(s, [SYS, USER, assistant(0), {"role": "user", "content": "x"}], TOOL)
    assert "role='user'" in err.value.message


def test_messages_match_ignores_render_irrelevant_differences():
    stored = assistant(1)
    replay = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "c1",
                "type": "function",
                "function": {"name": "f", "arguments": "{1}"},
            }
        ],
    }
    assert messages_match(stored, replay)
    assert messages_match({"role": "user", "content": ""}, {"role": "user"})
    assert not messages_match({"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    changed_args = {**stored, "tool_calls": [{**stored["tool_calls"][0], "id": "zz"}]}
    assert not messages_match(stored, changed_args)


def test_unchanged_since_detects_commits_and_same_length_rollbacks():
    s, stored = session_with_turns(2)
    n, last = 2, s.checkpoints[-1]
    assert unchanged_since(s, n, last)
    commit_turn(s, 1, stored[:3] + [tool(0, "x")], assistant(5), [1], record(5))
    assert s.num_assistant == 2  # same count ...
    assert not unchanged_since(s, n, last)  # ... but a different trajectory
    assert unchanged_since(Session(), 0, None)


def test_check_prefix():
    s, _ = session_with_turns(2)
    base = s.checkpoints[1]
    check_prefix(s, 2, base + [7, 8])
    check_prefix(s, 0, [5])
    with pytest.raises(ApiError) as err:
        check_prefix(s, 2, base[:-1] + [999, 7])
    assert err.value.status == 500
    assert f"first mismatch at index {len(base) - 1}" in err.value.message
    with pytest.raises(ApiError):
        check_prefix(s, 2, base[:2])
