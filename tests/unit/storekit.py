"""Helpers shared by the store and trajectory tests: turns committed the way the
chat route commits them, with SGLang-shaped answers."""

from __future__ import annotations

from array import array
from typing import Any

import orjson

from rollout_sessions.trajectory.rules import plan_turn
from rollout_sessions.trajectory.store import Trajectory, TurnWrite, cut_prompt_ids
from rollout_sessions.upstream.answer import parse_answer

TOOL = ("tool",)


def answer_json(prompt: list[int], completion: list[int], message: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "stop",
                    "prompt_token_ids": prompt,
                    "meta_info": {
                        "output_token_logprobs": [[-0.5 - t / 1000, t, None] for t in completion],
                        "completion_tokens": len(completion),
                    },
                }
            ],
        }
    )


def commit(
    traj: Trajectory,
    messages: list[dict[str, Any]],
    message: dict[str, Any],
    prompt: list[int],
    completion: list[int],
    rest: dict[str, Any] | None = None,
    roles: tuple[str, ...] = TOOL,
    with_input_ids: bool = False,
) -> bytes:
    """Plan and record one turn; returns the answer as the upstream sent it."""
    message_bytes = [orjson.dumps(m) for m in messages]
    plan = plan_turn(traj, messages, message_bytes, roles)
    raw = answer_json(prompt, completion, message)
    parsed = parse_answer(raw)
    cut, at = cut_prompt_ids(raw, parsed.prompt_ids, lambda: parsed.response)
    write = traj.prepare(
        keep=plan.keep,
        exact=plan.exact,
        message_bytes=message_bytes,
        assistant=orjson.dumps(parsed.message),
        rest=orjson.dumps({"model": "m"} if rest is None else rest)[1:-1],
        with_input_ids=with_input_ids,
        prompt=parsed.prompt_ids,
        completion=parsed.completion_ids,
        logprobs=parsed.logprobs,
        answer=cut,
        cut=at,
        timestamps=(2.0, 1.0),
    )
    if traj.num_turns == 0 and traj.version == 0:  # a new trajectory (ids are reused)
        WRITES[id(traj)] = []
    traj.apply(write)
    WRITES[id(traj)].append(write)
    return raw


# Every write each trajectory applied, to replay them as the journal would.
WRITES: dict[int, list[TurnWrite]] = {}


def replayed(traj: Trajectory) -> Trajectory:
    """A trajectory rebuilt from ``traj``'s writes through the journal's encoding."""
    from rollout_sessions.journal.db import frame, head_bytes, turn_write

    copy = Trajectory()
    for w in WRITES[id(traj)]:
        row = (w.keep, head_bytes(w), w.rest, frame(w.messages), w.suffix.tobytes(), 0)
        copy.apply(turn_write(row), keep_answer=False)
    return copy


def ids(values: list[int]) -> array:
    return array("i", values)
