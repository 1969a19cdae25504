"""Interim (1xx) answers from the upstream, against the real ``serve``: HTTP
requires a client to skip a 1xx it did not expect, and the final answer that
follows is the answer, on the chat route and on the generic forward."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import ServerProc, serve
from fake_upstream import FakeUpstream

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(fake: FakeUpstream) -> Iterator[ServerProc]:
    srv = serve("--upstream", fake.url)
    yield srv
    srv.cleanup()


INTERIMS = [[100], [102], [103], [100, 102, 103]]


@pytest.mark.parametrize("interim", INTERIMS, ids=lambda s: "+".join(map(str, s)))
def test_a_chat_turn_skips_interim_answers(proxy, fake, interim):
    fake.mode, fake.interim = "interim", interim
    sid = "interim-" + "-".join(map(str, interim))
    messages = list(MSG)
    for _ in range(2):  # the second turn runs on the pooled connection
        resp = proxy.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": messages})
        assert resp.status_code == 200, resp.text
        message = resp.json()["choices"][0]["message"]
        assert message["content"] == f"answer to {messages[-1]['content']}"
        messages += [message, {"role": "tool", "tool_call_id": "c", "content": "more"}]
    records = proxy.get(f"/sessions/{sid}").json()["records"]
    assert [r["status_code"] for r in records] == [200, 200]


@pytest.mark.parametrize("interim", INTERIMS, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_generic_forward_skips_interim_answers(proxy, fake, interim, method):
    fake.mode, fake.interim = "interim", interim
    for _ in range(2):
        resp = proxy.request(method, "/sessions/fwd/v1/models", json={"messages": MSG})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "answer to hello"
    target = fake.requests[-1][1]
    assert target == "/v1/models"
    assert proxy.get("/sessions/fwd").json()["records"] == []  # the forward records nothing
