"""An upstream whose ``prompt_token_ids`` stop short of the stored checkpoint,
against the real ``serve``. The turn's prompt must cover the checkpoint (the
previous turns' prompts and completions): if it stops short, the tokens it
leaves out come back as "generated" and the new turn's span overlaps the
previous completion. An upstream defect: 502 naming it, nothing recorded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import ServerProc
from fake_upstream import FakeUpstream, chat_answer

FIRST = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def first_turn(srv: ServerProc, sid: str) -> tuple[list[dict], list[int]]:
    resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": FIRST})
    assert resp.status_code == 200, resp.text
    messages = [*FIRST, resp.json()["choices"][0]["message"]]
    messages.append({"role": "tool", "tool_call_id": "c", "content": "result"})
    return messages, srv.get(f"/sessions/{sid}").json()["metadata"]["accumulated_token_ids"]


def answer_with(messages: list[dict], prompt: list[int], completion: list[int]) -> dict:
    answer = chat_answer({"messages": messages})
    choice = answer["choices"][0]
    choice["prompt_token_ids"] = prompt
    choice["meta_info"]["output_token_logprobs"] = [[-0.5, t, None] for t in completion]
    choice["meta_info"]["completion_tokens"] = len(completion)
    return answer


@pytest.mark.parametrize("short_by", [1, 3])
def test_a_prompt_short_of_the_checkpoint_is_502_and_unrecorded(server_factory, fake, short_by):
    srv = server_factory("--upstream", fake.url)
    messages, checkpoint = first_turn(srv, "short")
    before = srv.get("/sessions/short").json()
    samples_before = srv.post(
        "/sessions/short/samples", json={}, headers={"Accept": "application/json"}
    )
    # Prompt + completion still start with the checkpoint: only the prompt's
    # length tells that the backend claims already-generated tokens again.
    cut = len(checkpoint) - short_by
    fake.mode = "json"
    fake.custom = answer_with(messages, checkpoint[:cut], [*checkpoint[cut:], 7, 8, 9])
    resp = srv.post("/sessions/short/v1/chat/completions", json={"messages": messages})
    assert resp.status_code == 502, resp.text
    assert resp.json() == {
        "error": f"malformed backend answer: prompt_token_ids ({cut} tokens) stop short of "
        f"the stored checkpoint ({len(checkpoint)} tokens); a turn's prompt must contain "
        f"the whole trajectory before it, turn not recorded"
    }
    assert srv.get("/sessions/short").json() == before
    after = srv.post("/sessions/short/samples", json={}, headers={"Accept": "application/json"})
    assert after.json() == samples_before.json()


def test_a_prompt_that_covers_the_checkpoint_is_recorded(server_factory, fake):
    srv = server_factory("--upstream", fake.url)
    messages, checkpoint = first_turn(srv, "covers")
    fake.mode = "json"
    fake.custom = answer_with(messages, checkpoint, [7, 8, 9])  # exactly the checkpoint
    resp = srv.post("/sessions/covers/v1/chat/completions", json={"messages": messages})
    assert resp.status_code == 200, resp.text
    meta = srv.post(
        "/sessions/covers/samples", json={}, headers={"Accept": "application/json"}
    ).json()["metadata"]
    (a0, b0), (a1, b1) = meta["turns"]
    assert b0 <= a1 and (a1, b1) == (len(checkpoint), len(checkpoint) + 3)
