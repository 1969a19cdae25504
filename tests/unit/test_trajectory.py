"""The trajectory rules (no server): matching, extension, rollback, roles."""

from __future__ import annotations

import orjson
import pytest
from storekit import TOOL, commit

from rollout_sessions.trajectory.rules import messages_match, plan_turn
from rollout_sessions.trajectory.store import Trajectory
from rollout_sessions.web.errors import ApiError

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


def trajectory_with_turns(n: int) -> tuple[Trajectory, list[dict]]:
    """n recorded turns: messages [SYS, USER, a0, t0, a1, t1, ..., a(n-1)]."""
    traj = Trajectory()
    msgs = [SYS, USER]
    tokens = [1, 2]
    for i in range(n):
        commit(traj, msgs, assistant(i), tokens, [10 + i, 20 + i])
        tokens = tokens + [10 + i, 20 + i, 30 + i]
        msgs = [*msgs, assistant(i), tool(i)]
    return traj, [orjson.loads(m) for m in traj.messages]


def plan(traj: Trajectory | None, msgs: list[dict], roles: tuple[str, ...] = TOOL):
    return plan_turn(traj, msgs, [orjson.dumps(m) for m in msgs], roles)


def test_first_turn_accepts_any_roles():
    msgs = [SYS, USER, assistant(0), {"role": "user", "content": "again"}]
    assert plan(None, msgs).keep == 0
    assert plan(Trajectory(), msgs).keep == 0


def test_extension_keeps_every_turn():
    traj, stored = trajectory_with_turns(2)
    p = plan(traj, [*stored, tool(1)])
    assert (p.keep, p.tail_start, p.exact) == (2, 5, 5)
    assert plan(traj, list(stored)).keep == 2  # nothing appended: a new turn on the same prompt


def test_append_role_limited_to_allowed():
    traj, stored = trajectory_with_turns(1)
    with pytest.raises(ApiError) as err:
        plan(traj, [*stored, {"role": "user", "content": "more"}])
    assert err.value.status == 400
    assert "appended message at index 3 has role='user'" in err.value.message
    assert plan(traj, [*stored, {"role": "user", "content": "more"}], ("tool", "user")).keep == 1


def test_one_step_rollback_is_planned_not_applied():
    traj, stored = trajectory_with_turns(2)
    version, tokens, messages = traj.version, traj.tokens.tolist(), list(traj.messages)
    retry = [SYS, USER, assistant(0), tool(0, "different")]
    p = plan(traj, retry)
    assert (p.keep, p.tail_start, p.exact) == (1, 3, 3)
    assert (traj.version, traj.tokens.tolist(), traj.messages) == (version, tokens, messages)
    commit(traj, retry, assistant(9), [1, 2, 10, 20, 77], [99])
    assert traj.num_turns == 2
    assert [orjson.loads(m) for m in traj.messages] == [*retry, assistant(9)]
    assert traj.tokens.tolist() == [1, 2, 10, 20, 77, 99]


def test_same_turn_retry_is_a_one_step_rollback():
    traj, _ = trajectory_with_turns(2)
    assert plan(traj, [SYS, USER, assistant(0), tool(0)]).keep == 1


def test_two_step_rollback_refused_with_the_production_text():
    traj, stored = trajectory_with_turns(3)
    with pytest.raises(ApiError) as err:
        plan(traj, [SYS, USER, assistant(0), tool(0, "other")])
    assert err.value.status == 400
    assert err.value.message == (
        "rollback failed: discard_count=2 exceeds max_assistant_rollback_steps=1 "
        "(stored has 7 messages, request has 4 messages)"
    )


def test_rollback_of_the_only_turn_starts_over():
    traj, _ = trajectory_with_turns(1)
    assert plan(traj, [SYS, {"role": "user", "content": "other"}]).keep == 0
    traj2, _ = trajectory_with_turns(2)
    with pytest.raises(ApiError):
        plan(traj2, [SYS, {"role": "user", "content": "other"}])


def test_rollback_tail_roles_checked():
    traj, _ = trajectory_with_turns(2)
    with pytest.raises(ApiError) as err:
        plan(traj, [SYS, USER, assistant(0), {"role": "user", "content": "x"}])
    assert "role='user'" in err.value.message


def test_few_shot_assistants_are_not_turns():
    few_shot = [SYS, USER, {"role": "assistant", "content": "example"}, USER]
    traj = Trajectory()
    commit(traj, few_shot, assistant(0), [1, 2, 3], [4])
    msgs = [*few_shot, assistant(0), tool(0)]
    commit(traj, msgs, assistant(1), [1, 2, 3, 4, 5], [6])
    # A retry diverging after the first generated turn rolls back one turn, not two.
    p = plan(traj, [*few_shot, assistant(0), tool(0, "changed")])
    assert (p.keep, p.tail_start) == (1, 5)


def test_a_reserialised_message_matches_but_is_not_exact():
    traj, stored = trajectory_with_turns(1)
    replay = {**stored[2], "content": None, "refusal": None}
    p = plan(traj, [SYS, USER, replay, tool(0)])
    assert (p.keep, p.exact) == (1, 2)


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


def test_every_commit_moves_the_version():
    traj, stored = trajectory_with_turns(2)
    before = traj.version
    commit(traj, stored[:3] + [tool(0, "x")], assistant(5), [1, 2, 10, 20], [1])
    assert traj.num_turns == 2  # same count ...
    assert traj.version == before + 1  # ... but a different trajectory
