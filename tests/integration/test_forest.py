"""Tree mode (``TRAJECTORY=tree``) over real sockets against the real ``serve``.

Compaction, deep retry, sub-agent, concurrent siblings and n > 1 record as
nodes; truncated and capped turns are 409 before any upstream call; GET shows
the active path and ``metadata.tree``; the samples export gives one sample per
kept leaf (pickers, train-once masks, reward and metadata, R3 arrays); a
forest survives ``kill -9``; linear mode answers ``n > 1`` with 400.
"""

from __future__ import annotations

import concurrent.futures
import signal
from typing import Any

import numpy as np
import pytest
from conftest import TOOLS, ServerProc
from safetensors.numpy import load

from rollout_sessions.testing.processes import ManagedProcess

JSON = {"Accept": "application/json"}
SYS = {"role": "system", "content": "you are a coding agent"}
USER = {"role": "user", "content": "fix the bug"}


def chat(srv: ServerProc, sid: str, messages: list[dict], **extra: Any) -> dict:
    body = {"messages": messages, **extra}
    resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def echo_requests(echo: ManagedProcess) -> int:
    import requests

    return requests.get(echo.url + "/echo/stats", timeout=10).json()["chat_requests"]


def tool_msg(i: int) -> dict:
    return {"role": "tool", "content": f"result {i}", "tool_call_id": f"c{i}"}


def agent(srv: ServerProc, sid: str, turns: int, start: list[dict] | None = None) -> list[dict]:
    """A tool-calling agent: ``turns`` turns, each answer sent back with a tool result."""
    messages = list(start or [SYS, USER])
    for i in range(turns):
        answer = chat(srv, sid, messages, tools=TOOLS, echo={"tool_rounds": 99})
        messages = [*messages, answer["choices"][0]["message"], tool_msg(i)]
    return messages


def tree_of(srv: ServerProc, sid: str, query: str = "") -> dict:
    resp = srv.get(f"/sessions/{sid}{query}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def samples(srv: ServerProc, sid: str, body: dict | None = None) -> dict:
    resp = srv.post(f"/sessions/{sid}/samples", json=body or {}, headers=JSON)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def tree(echo: ManagedProcess) -> ServerProc:
    from conftest import serve

    proc = serve("--upstream", echo.url, "--trajectory", "tree", "--no-journal")
    yield proc
    proc.cleanup()


def test_compaction_records_a_new_root_and_reads_like_linear(tree: ServerProc) -> None:
    sid = "forest-compact"
    messages = agent(tree, sid, 4)
    before = tree_of(tree, sid)
    assert len(before["records"]) == 4 and before["metadata"]["num_assistant"] == 4
    # The agent compacts: its history becomes a summary. Linear mode refuses this.
    summary = [SYS, {"role": "user", "content": "summary of 4 turns; go on"}]
    chat(tree, sid, summary)
    after = tree_of(tree, sid)
    nodes = after["metadata"]["tree"]["nodes"]
    assert [n["parent"] for n in nodes] == [None, 0, 1, 2, None]
    assert after["metadata"]["tree"]["leaves"] == [3, 4]
    assert after["metadata"]["tree"]["active_leaf"] == 4
    # records: the active path only (the new root), as a linear harness expects
    assert len(after["records"]) == 1
    assert after["records"][0]["request"]["messages"] == summary
    # every node's record, tagged
    every = tree_of(tree, sid, "?records=all")["records"]
    assert [(r["node_id"], r["parent"]) for r in every] == [
        (0, None), (1, 0), (2, 1), (3, 2), (4, None),
    ]  # fmt: skip
    assert every[3]["request"]["messages"] == messages[:-2]
    # the old path's tokens are still the records' tokens
    assert before["records"][3] == {
        k: v for k, v in every[3].items() if k not in ("node_id", "parent")
    }


def test_deep_retry_and_subagent_become_siblings_and_roots(tree: ServerProc) -> None:
    sid = "forest-retry"
    messages = agent(tree, sid, 4)  # nodes 0..3
    # retry two steps back: the tool result of turn 1 changes
    retry = [*messages[:5], {"role": "tool", "content": "other", "tool_call_id": "c1"}]
    chat(tree, sid, retry, tools=TOOLS, echo={"tool_rounds": 99})
    nodes = tree_of(tree, sid)["metadata"]["tree"]["nodes"]
    assert nodes[4]["parent"] == 1  # under node 1, beside node 2
    # a sub-agent with its own system prompt, 3 turns
    agent(tree, sid, 3, start=[{"role": "system", "content": "sub-agent"}, USER])
    tree_meta = tree_of(tree, sid)["metadata"]["tree"]
    assert [n["parent"] for n in tree_meta["nodes"][5:]] == [None, 5, 6]
    assert tree_meta["leaves"] == [3, 4, 7]


def test_n_choices_become_siblings_and_a_later_turn_attaches_under_its_choice(
    tree: ServerProc,
) -> None:
    sid = "forest-n"
    answer = chat(tree, sid, [SYS, USER], n=4)
    texts = [c["message"]["content"] for c in answer["choices"]]
    assert len(texts) == 4 and len(set(texts)) == 4
    meta = tree_of(tree, sid)["metadata"]["tree"]
    assert [n["parent"] for n in meta["nodes"]] == [None] * 4
    # the agent goes on with candidate 3
    chosen = answer["choices"][3]["message"]
    chat(tree, sid, [SYS, USER, chosen, {"role": "user", "content": "go on"}])
    meta = tree_of(tree, sid)["metadata"]["tree"]
    assert meta["nodes"][4]["parent"] == 3
    # each choice's record holds that choice
    every = tree_of(tree, sid, "?records=all")["records"]
    assert [r["response"]["choices"][0]["message"]["content"] for r in every[:4]] == texts
    # drop_retries keeps all n choices (one request)
    out = samples(tree, sid)
    assert [s["leaf"] for s in out["metadata"]["samples"]] == [0, 1, 2, 4]


def test_concurrent_turns_from_one_point_are_both_recorded(tree: ServerProc) -> None:
    sid = "forest-concurrent"
    messages = agent(tree, sid, 2)
    body = {"messages": messages, "echo": {"latency_ms": 300}}
    import requests

    def go_fresh(i: int) -> int:  # a connection per thread
        b = {**body, "echo": {**body["echo"], "text": f"branch {i}"}}
        return requests.post(
            f"{tree.url}/sessions/{sid}/v1/chat/completions", json=b, timeout=30
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(go_fresh, [0, 1])) == [200, 200]
    meta = tree_of(tree, sid)["metadata"]["tree"]
    assert [n["parent"] for n in meta["nodes"][2:]] == [1, 1]
    # they overlapped: drop_retries keeps both
    kept = [s["leaf"] for s in samples(tree, sid)["metadata"]["samples"]]
    assert kept == [2, 3]


def test_truncated_node_is_409_without_an_upstream_call(
    tree: ServerProc, echo: ManagedProcess
) -> None:
    sid = "forest-truncated"
    first = chat(tree, sid, [SYS, USER], echo={"finish_reason": "length"})
    nodes = tree_of(tree, sid)["metadata"]["tree"]["nodes"]
    assert nodes[0]["finish_reason"] == "length"
    calls = echo_requests(echo)
    extend = [SYS, USER, first["choices"][0]["message"], {"role": "user", "content": "more"}]
    resp = tree.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": extend})
    assert resp.status_code == 409
    assert resp.json()["error"].startswith("truncated generation cannot be extended: ")
    assert echo_requests(echo) == calls
    assert len(tree_of(tree, sid)["metadata"]["tree"]["nodes"]) == 1
    # retrying the turn itself (a new root) is fine
    chat(tree, sid, [SYS, USER])


def test_node_cap_is_409_naming_it_without_an_upstream_call(
    server_factory: Any, echo: ManagedProcess
) -> None:
    srv = server_factory(
        "--upstream", echo.url, "--trajectory", "tree", "--max-tree-nodes", "3", "--no-journal"
    )
    sid = "forest-cap"
    chat(srv, sid, [SYS, USER], n=2)
    calls = echo_requests(echo)
    resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": [SYS, USER], "n": 2})
    assert resp.status_code == 409 and "MAX_TREE_NODES=3" in resp.json()["error"]
    assert echo_requests(echo) == calls
    chat(srv, sid, [SYS, USER])  # the third node fits
    resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": [SYS, USER]})
    assert resp.status_code == 409
    assert len(tree_of(srv, sid)["metadata"]["tree"]["nodes"]) == 3


def test_prefix_mismatch_without_tito_is_a_flagged_root(tree: ServerProc) -> None:
    sid = "forest-mismatch"
    first = chat(tree, sid, [SYS, USER])
    stored = first["choices"][0]["message"]
    messages = [SYS, USER, stored, {"role": "user", "content": "next"}]
    # The backend's prompt ids this time do not extend node 0's tokens.
    answer = chat(tree, sid, messages, echo={"fault": "bad_prompt_ids"})
    assert answer["choices"][0]["message"]["content"]
    nodes = tree_of(tree, sid)["metadata"]["tree"]["nodes"]
    assert nodes[1]["parent"] is None and nodes[1]["prefix_mismatch"] is True
    assert "prefix_mismatch" not in nodes[0]
    every = tree_of(tree, sid, "?records=all")["records"]
    assert every[1]["request"]["messages"] == messages  # nothing the model saw is lost
    assert every[1]["response"]["choices"][0]["prompt_token_ids"][0] == 299
    # a normal extension still attaches under node 0
    chat(tree, sid, messages)
    assert tree_of(tree, sid)["metadata"]["tree"]["nodes"][2]["parent"] == 0


def test_samples_pickers_train_once_reward_metadata(server_factory: Any, echo: Any) -> None:
    results = {}
    for picker in ("drop_retries", "all", "active"):
        srv = server_factory(
            "--upstream", echo.url, "--trajectory", "tree", "--sample-picker", picker,
            "--no-journal",
        )  # fmt: skip
        sid = "forest-pick"
        messages = agent(srv, sid, 3)  # 0 -> 1 -> 2
        # a retry of the last turn after it was committed: node 3 under node 1
        chat(srv, sid, messages[:5], tools=TOOLS, echo={"tool_rounds": 99, "text": "x"})
        body = {"reward": 0.5, "metadata": {"task": "t1", "leaf": "client's"}}
        results[picker] = samples(srv, sid, body)
    drop = results["drop_retries"]["metadata"]["samples"]
    assert [s["leaf"] for s in drop] == [3]  # node 2 superseded by the retry
    every = results["all"]
    assert [s["leaf"] for s in every["metadata"]["samples"]] == [2, 3]
    assert [s["leaf"] for s in results["active"]["metadata"]["samples"]] == [3]
    for s in every["metadata"]["samples"]:
        assert s["reward"] == 0.5 and s["task"] == "t1"
        assert s["finish_reasons"][-1] in ("tool_calls", "stop")
        assert len(s["weight_versions"]) == len(s["path"]) == len(s["turns"])
    # the server's keys win over the body's metadata
    assert every["metadata"]["samples"][0]["leaf"] == 2
    # train once: nodes 0 and 1 are shared; trained in sample of leaf 2 only
    offsets = every["offsets"]
    mask = np.array(every["loss_mask"])
    first, second = mask[offsets[0] : offsets[1]], mask[offsets[1] : offsets[2]]
    s0, s1 = every["metadata"]["samples"]
    for start, stop in s0["turns"]:
        assert first[start:stop].all()
    shared = s1["turns"][:2]
    for start, stop in shared:
        assert not second[start:stop].any()
    start, stop = s1["turns"][2]
    assert second[start:stop].all()
    lp = np.array(every["rollout_log_probs"])
    assert (lp[mask == 0] == 0).all()
    tokens = np.array(every["tokens"])
    assert len(tokens) == offsets[-1] and len(offsets) == 3


def test_r3_arrays_and_weight_versions(tree: ServerProc) -> None:
    sid = "forest-r3"
    answer = chat(
        tree,
        sid,
        [SYS, USER],
        echo={"replay_width": 3, "weight_version": "w7", "cached_tokens": 5},
    )
    assert "routed_experts" not in answer["choices"][0]["meta_info"]
    resp = tree.post(f"/sessions/{sid}/samples", json={})
    assert resp.status_code == 200, resp.text
    arrays = load(resp.content)
    tokens = arrays["tokens"]
    routed = arrays["rollout_routed_experts"]
    assert routed.dtype == np.int32 and routed.shape == (len(tokens) - 1, 3)
    assert (routed[:, 0] == tokens[:-1] % 64).all()
    assert (arrays["rollout_indexer_topk"][:, 0] == (tokens[:-1] + 1) % 64).all()
    import json

    raw = resp.content
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    (sample,) = json.loads(header["__metadata__"]["samples"])
    assert sample["weight_versions"] == ["w7"] and sample["cached_tokens"] == [5]
    assert arrays["offsets"].tolist() == [0, len(tokens)]


def test_linear_mode_refuses_n_and_keeps_its_export_shape(srv: ServerProc) -> None:
    resp = srv.post("/sessions/linear-n/v1/chat/completions", json={"messages": [USER], "n": 2})
    assert resp.status_code == 400 and "TRAJECTORY=tree" in resp.json()["error"]
    assert srv.get("/sessions/linear-n").json()["metadata"] == {}  # nothing created
    chat(srv, "linear-s", [USER], echo={"replay_width": 2, "weight_version": 3})
    out = samples(srv, "linear-s", {"reward": 1, "metadata": {"k": "v"}})
    meta = out["metadata"]
    assert meta["num_assistant"] == 1 and meta["truncated"] is False
    assert out["offsets"] == [0, len(out["tokens"])]
    (sample,) = meta["samples"]
    assert sample["leaf"] is None and sample["path"] is None
    assert sample["reward"] == 1 and sample["k"] == "v" and sample["weight_versions"] == [3]
    assert len(out["rollout_routed_experts"]) == len(out["tokens"]) - 1
    bad = srv.post("/sessions/linear-s/samples", json={"reward": "high"})
    assert bad.status_code == 400
    bad = srv.post("/sessions/linear-s/samples", json={"metadata": []})
    assert bad.status_code == 400


def test_forest_survives_kill_9(server_factory: Any, echo: ManagedProcess, tmp_path: Any) -> None:
    flags = ("--upstream", echo.url, "--trajectory", "tree", "--data-dir", str(tmp_path / "d"))
    srv = server_factory(*flags)
    sid = "forest-durable"
    messages = agent(srv, sid, 3)
    chat(srv, sid, messages[:3], n=2)  # two siblings under node 0
    chat(srv, sid, [SYS, {"role": "user", "content": "compacted"}])
    before = tree_of(srv, sid, "?records=all")
    before_samples = srv.post(f"/sessions/{sid}/samples", json={}).content
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    again = server_factory(*flags)
    after = tree_of(again, sid, "?records=all")
    assert after["records"] == before["records"]
    assert after["metadata"]["tree"] == before["metadata"]["tree"]
    after_samples = again.post(f"/sessions/{sid}/samples", json={}).content
    assert _header(after_samples) == _header(before_samples)
    assert load(after_samples).keys() == load(before_samples).keys()
    for name, values in load(after_samples).items():
        assert (values == load(before_samples)[name]).all(), name
    # and it goes on: a turn under the restored node 2
    agent_next = chat(again, sid, messages, tools=TOOLS, echo={"tool_rounds": 99})
    assert agent_next["choices"]
    assert tree_of(again, sid)["metadata"]["tree"]["nodes"][-1]["parent"] == 2


def _header(raw: bytes) -> dict:
    import json

    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def test_a_restart_with_another_matcher_reindexes_and_modes_do_not_mix(
    server_factory: Any, echo: ManagedProcess, tmp_path: Any
) -> None:
    import sqlite3

    data = str(tmp_path / "d")
    flags = ("--upstream", echo.url, "--trajectory", "tree", "--data-dir", data)
    srv = server_factory(*flags)
    sid = "forest-matcher"
    first = chat(srv, sid, [SYS, USER])["choices"][0]["message"]
    srv.cleanup()  # a clean stop this time
    again = server_factory(*flags, "--message-matcher", "role_content_only")
    # A re-sent assistant message with extra reasoning matches node 0 on role and
    # content: the turn attaches there (under strict it would be a plain new root);
    # the echo renders the reasoning, so its tokens do not extend node 0's: a
    # flagged root, which only an attach can give.
    resent = {**first, "reasoning_content": "thought about it"}
    chat(again, sid, [SYS, USER, resent, {"role": "user", "content": "next"}])
    node = tree_of(again, sid)["metadata"]["tree"]["nodes"][1]
    assert node["parent"] is None and node["prefix_mismatch"] is True
    # deleting frees the nodes on disk
    chat(again, "forest-other", [USER])
    assert again.delete(f"/sessions/{sid}").status_code == 204
    again.cleanup()
    with sqlite3.connect(tmp_path / "d" / "journal.sqlite3") as conn:
        kept = conn.execute("SELECT DISTINCT key FROM nodes").fetchall()
    assert len(kept) == 1
    # a journal with forests is refused in linear mode, naming the setting
    with pytest.raises(RuntimeError) as err:
        server_factory("--upstream", echo.url, "--data-dir", data)
    assert "--trajectory tree" in str(err.value)


def test_a_stream_with_n_choices_carries_every_choice(tree: ServerProc) -> None:
    import json

    sid = "forest-stream-n"
    body = {"messages": [SYS, USER], "n": 3, "stream": True}
    resp = tree.post(f"/sessions/{sid}/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 1, 2]
    assert len(tree_of(tree, sid)["metadata"]["tree"]["nodes"]) == 3


def test_the_documented_trainer_reader(tree: ServerProc) -> None:
    """The reader of docs/trajectories-tree.md, on a two-leaf tree with R3 payloads."""
    import json

    import requests

    def read_samples(server: str, sid: str, reward: float) -> list[dict]:
        raw = requests.post(f"{server}/sessions/{sid}/samples", json={"reward": reward}).content
        arrays = load(raw)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        metas = json.loads(header["__metadata__"]["samples"])
        offsets = arrays["offsets"]
        samples = []
        for i, meta in enumerate(metas):
            start, stop = offsets[i], offsets[i + 1]
            sample = {
                name: arrays[name][start:stop]
                for name in ("tokens", "loss_mask", "rollout_log_probs")
            }
            if "rollout_routed_experts" in arrays:  # one row per token but the last
                rows = arrays["rollout_routed_experts"]
                sample["routed_experts"] = rows[start - i : stop - i - 1]
            samples.append({**sample, "reward": meta["reward"], "meta": meta})
        return samples

    sid = "forest-reader"
    replay = {"replay_width": 2}
    first = chat(tree, sid, [SYS, USER], echo=replay)["choices"][0]["message"]
    chat(tree, sid, [SYS, USER, first, {"role": "user", "content": "a"}], echo=replay, n=2)
    samples = read_samples(tree.url, sid, 2.0)
    assert [s["meta"]["leaf"] for s in samples] == [1, 2]
    for s in samples:
        assert s["reward"] == 2.0
        tokens = s["tokens"]
        assert (s["routed_experts"][:, 0] == tokens[:-1] % 64).all()
    # node 0's completion is trained in the first sample only
    start, stop = samples[1]["meta"]["turns"][0]
    assert not samples[1]["loss_mask"][start:stop].any()
    assert samples[0]["loss_mask"][start:stop].all()


def test_a_full_journal_is_507_and_the_forest_is_unchanged(
    server_factory: Any, echo: ManagedProcess, tmp_path: Any
) -> None:
    srv = server_factory(
        "--upstream", echo.url, "--trajectory", "tree", "--data-dir", str(tmp_path / "d"),
        "--journal-max-bytes", str(1 << 20),
    )  # fmt: skip
    sid = "forest-full"
    first = chat(srv, sid, [SYS, USER])["choices"][0]["message"]
    before = tree_of(srv, sid, "?records=all")
    huge = [SYS, USER, first, {"role": "tool", "content": "y" * (3 << 20)}]
    resp = srv.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": huge, "n": 2})
    assert resp.status_code == 507 and resp.json()["error"].startswith("journal full")
    assert tree_of(srv, sid, "?records=all") == before
    # the session goes on: the next node is number 1
    chat(srv, sid, [SYS, USER, first, {"role": "tool", "content": "small"}])
    assert [n["id"] for n in tree_of(srv, sid)["metadata"]["tree"]["nodes"]] == [0, 1]


def test_tree_mode_takes_over_a_journal_of_linear_sessions(
    server_factory: Any, echo: ManagedProcess, tmp_path: Any
) -> None:
    data = ("--upstream", echo.url, "--data-dir", str(tmp_path / "d"))
    linear = server_factory(*data)
    sid = "forest-was-linear"
    messages = agent(linear, sid, 3)
    before = tree_of(linear, sid)
    before_samples = samples(linear, sid)
    linear.proc.send_signal(signal.SIGKILL)
    linear.proc.wait(10)
    tree = server_factory(*data, "--trajectory", "tree")
    after = tree_of(tree, sid)
    assert after["records"] == before["records"]
    assert after["metadata"]["accumulated_token_ids"] == before["metadata"]["accumulated_token_ids"]
    assert [n["parent"] for n in after["metadata"]["tree"]["nodes"]] == [None, 0, 1]
    ids = [r["response"]["id"] for r in before["records"]]
    assert [n["response_id"] for n in after["metadata"]["tree"]["nodes"]] == ids
    converted = samples(tree, sid)
    for name in ("tokens", "loss_mask", "rollout_log_probs"):
        assert converted[name] == before_samples[name], name
    chat(tree, sid, messages, tools=TOOLS, echo={"tool_rounds": 99})
    assert tree_of(tree, sid)["metadata"]["tree"]["nodes"][3]["parent"] == 2
    tree.cleanup()
    again = server_factory(*data, "--trajectory", "tree")  # now nodes on disk
    assert len(tree_of(again, sid)["metadata"]["tree"]["nodes"]) == 4
