"""The compact trajectory store against a model that keeps everything.

Random conversations (extensions, retries of the last turn, divergent retries,
re-serialised assistant messages, changing request fields) are recorded in
both; every record, checkpoint and the training arrays must agree.
"""

from __future__ import annotations

import json
from array import array
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storekit import answer_json, commit, replayed

from rollout_sessions.trajectory.rules import messages_match
from rollout_sessions.trajectory.store import Trajectory, cut_prompt_ids
from rollout_sessions.upstream.answer import parse_answer

SYS = {"role": "system", "content": "agent"}
USER = {"role": "user", "content": "task"}


class Model:
    """Stores every turn whole, as the records are defined."""

    def __init__(self) -> None:
        self.records: list[tuple[dict, dict]] = []
        self.checkpoints: list[list[int]] = []
        self.requests: list[list[dict]] = []  # the messages each kept turn sent

    def commit(self, keep: int, request: dict, response: dict, checkpoint: list[int]) -> None:
        del self.records[keep:], self.checkpoints[keep:], self.requests[keep:]
        self.records.append((request, response))
        self.checkpoints.append(checkpoint)
        self.requests.append(request["messages"])


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["extend", "extend", "retry", "diverge", "reserialise", "early"]),
        st.lists(st.integers(0, 50_000), min_size=1, max_size=6),  # completion
        st.lists(st.integers(0, 50_000), min_size=0, max_size=5),  # new prompt tokens
        st.sampled_from([{"model": "m"}, {"model": "m", "temperature": 0.5}, {}]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_store_equals_the_model(actions: list[Any]) -> None:
    traj, model = Trajectory(), Model()
    messages: list[dict] = [SYS, USER]
    for step, (action, completion, fresh, rest) in enumerate(actions):
        n = len(model.records)
        if action == "retry" and n:
            messages = model.requests[-1]  # the last turn, sent again: one step back
        elif action == "diverge" and n and model.requests[-1][-1]["role"] == "tool":
            messages = [*model.requests[-1][:-1], {"role": "tool", "content": f"other {step}"}]
        elif action == "reserialise" and n:
            last = orjson.loads(traj.messages[-1])
            messages = [*model.requests[-1], {**last, "refusal": None}, tool(step)]
        elif action == "early" and n:
            # An earlier message sent again with an extra field: it still matches,
            # but earlier records must keep the message as they sent it.
            first = {**model.requests[-1][0], "name": f"n{step}"}
            last = orjson.loads(traj.messages[-1])
            messages = [first, *model.requests[-1][1:], last, tool(step)]
        elif n:
            messages = [*model.requests[-1], orjson.loads(traj.messages[-1]), tool(step)]
        keep = _keep(model, messages)
        base = model.checkpoints[keep - 1] if keep else []
        prompt = base + fresh + [7]
        message = {"role": "assistant", "content": f"answer {step}"}
        raw = commit(traj, messages, message, prompt, completion, rest)
        request = {**rest, "messages": messages}
        model.commit(keep, request, orjson.loads(raw), prompt + completion)
        _check(traj, model)


def tool(step: int) -> dict:
    return {"role": "tool", "content": f"result {step}"}


def _keep(model: Model, messages: list[dict]) -> int:
    """The model's rule: kept turns are those whose request and answer the new
    messages still repeat (at most one dropped)."""
    keep = 0
    for k, (request, response) in enumerate(model.records):
        sent = request["messages"]
        answer = response["choices"][0]["message"]
        if len(messages) <= len(sent):
            break
        if not all(map(messages_match, sent, messages)):
            break
        if not messages_match(answer, messages[len(sent)]):
            break
        keep = k + 1
    return keep


def _check(traj: Trajectory, model: Model) -> None:
    assert traj.num_turns == len(model.records)
    for k, (request, response) in enumerate(model.records):
        text = traj.record(k, "/v1/chat/completions")
        record = orjson.loads(text)
        assert list(record) == [
            "timestamp",
            "request_timestamp",
            "method",
            "path",
            "status_code",
            "request",
            "response",
        ]
        assert record["request"] == request
        assert record["response"] == response
        assert (record["method"], record["status_code"]) == ("POST", 200)
        assert record["path"] == "/v1/chat/completions"
        turn = traj.turns[k]
        assert (record["timestamp"], record["request_timestamp"]) == (
            turn.timestamp,
            turn.request_timestamp,
        )
        assert traj.checkpoint(k + 1).tolist() == model.checkpoints[k]
    assert traj.tokens.tolist() == model.checkpoints[-1]
    tokens, mask, logprobs, spans = traj.sample_arrays()
    assert tokens.tolist() == model.checkpoints[-1]
    for k, (start, stop) in enumerate(spans):
        response = model.records[k][1]
        generated = [e[1] for e in response["choices"][0]["meta_info"]["output_token_logprobs"]]
        assert tokens[start:stop].tolist() == generated[: stop - start]
        assert mask[start:stop].all()
    assert int(mask.sum()) == sum(stop - start for start, stop in spans)
    assert (logprobs[mask == 0] == 0).all()
    # What the journal keeps rebuilds the same trajectory after a restart.
    again = replayed(traj)
    answers = [turn.answer for turn in traj.turns]
    assert again.tokens == traj.tokens and again.messages == traj.messages
    for k in range(traj.num_turns):
        path = "/v1/chat/completions"
        assert again.record(k, path, answers[k]) == traj.record(k, path)


def test_a_checkpoint_whose_end_a_later_turn_drops_is_kept_with_its_turn():
    # glm47-style: the model stopped at <|user|> (99); the next prompt keeps
    # the checkpoint without it and the template opens with <|observation|> (98).
    traj = Trajectory()
    commit(traj, [SYS, USER], {"role": "assistant", "content": "a"}, [1, 2], [3, 99])
    msgs = [SYS, USER, {"role": "assistant", "content": "a"}, tool(1)]
    commit(traj, msgs, {"role": "assistant", "content": "b"}, [1, 2, 3, 98, 5], [6, 99])
    assert traj.checkpoint(1).tolist() == [1, 2, 3, 99]
    assert traj.checkpoint(2).tolist() == [1, 2, 3, 98, 5, 6, 99]
    first = orjson.loads(traj.record(0, "/v1/chat/completions"))["response"]["choices"][0]
    assert first["prompt_token_ids"] == [1, 2]
    assert [e[1] for e in first["meta_info"]["output_token_logprobs"]] == [3, 99]
    tokens, mask, _, spans = traj.sample_arrays()
    assert spans == [[2, 3], [5, 7]]  # turn 1's dropped 99 is not trained on
    assert mask.tolist() == [0, 0, 1, 0, 0, 1, 1]


def test_input_ids_are_rebuilt_into_the_request():
    traj = Trajectory()
    commit(traj, [USER], {"role": "assistant", "content": "a"}, [5, 6], [7], with_input_ids=True)
    request = orjson.loads(traj.record(0, "/v1/chat/completions"))["request"]
    assert request["input_ids"] == [5, 6]


@pytest.mark.parametrize(
    "text",
    [
        # compact, as SGLang writes it
        None,
        # spaces after separators: found by re-serialising
        "spaced",
        # the key's text inside a string value must not be taken for the key
        "decoy",
    ],
)
def test_prompt_ids_are_cut_out_and_put_back_exactly(text: str | None) -> None:
    prompt = array("i", [11, 22, 33])
    message = {"role": "assistant", "content": 'x\\"prompt_token_ids":[11,22,33] y'}
    raw = answer_json(prompt.tolist(), [1], message if text == "decoy" else {"content": ""})
    if text == "spaced":
        raw = json.dumps(json.loads(raw), separators=(", ", ": ")).encode()
    parsed = parse_answer(raw) if text != "spaced" else None
    response = orjson.loads(raw)
    cut, at = cut_prompt_ids(raw, prompt, lambda: response)
    assert b"[11,22,33]" not in cut[at - 20 : at + 20] or text == "decoy"
    rebuilt = cut[:at] + b"[11,22,33]" + cut[at:]
    assert orjson.loads(rebuilt) == orjson.loads(raw)
    if text is None:
        assert rebuilt == raw  # byte for byte
        assert parsed is not None
