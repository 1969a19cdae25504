"""The forest store and its rules, driven directly (``forest``, ``forest_rules``)."""

from __future__ import annotations

from array import array

import numpy as np
import orjson
import pytest

from rollout_sessions.trajectory import forest_rules as rules
from rollout_sessions.trajectory.forest import WITH_INPUT_IDS, Forest
from rollout_sessions.trajectory.samples import SamplesRequest, tree_samples

SYS = {"role": "system", "content": "s"}
USER = {"role": "user", "content": "u"}


def ids(*values: int) -> array:
    return array("i", values)


def add(
    forest: Forest,
    messages: list[dict],
    reply: str,
    prompt: list[int],
    completion: list[int],
    seen: int | None = None,
    finish: str = "stop",
    matcher: str = "strict",
) -> int:
    """A turn as the chat turn records it: attach, then commit under the attach node."""
    message_bytes = [orjson.dumps(m) for m in messages]
    digests, ones = rules.prefix_digests(messages, message_bytes, matcher, forest.memo)
    parent, matched = rules.attach(forest.index, digests)
    assistant = {"role": "assistant", "content": reply}
    own = rules.message_digest(assistant, matcher)
    answer = orjson.dumps({"id": f"r-{reply}", "choices": [{"prompt_token_ids": None}]})
    cut = answer.index(b"null")
    answer = answer[:cut] + answer[cut + 4 :]
    write = forest.prepare(
        parent=parent,
        seen=forest.n_nodes if seen is None else seen,
        matched=matched,
        message_bytes=message_bytes,
        assistant=orjson.dumps(assistant),
        rest=b'"model":"m"',
        flags=WITH_INPUT_IDS,
        prompt=ids(*prompt),
        completion=ids(*completion),
        logprobs=array("f", [-0.5] * len(completion)),
        answer=answer,
        cut=cut,
        timestamps=(2.0, 1.0),
        finish_reason=finish,
        response_id=f"r-{reply}",
        weight_version=None,
        cached_tokens=None,
        digest=rules.chain(digests[-1], own),
        message_digests=[*ones, own],
    )
    return forest.apply(write)


def digests_of(messages: list[dict], memo: dict | None = None) -> list[bytes]:
    return rules.prefix_digests(messages, [orjson.dumps(m) for m in messages], "strict", memo)[0]


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# -- matchers ---------------------------------------------------------------------


def test_strict_matcher_is_the_linear_rule() -> None:
    a = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "x"}]}
    b = {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}], "refusal": None}
    assert rules.messages_match(a, b, "strict")
    assert not rules.messages_match(a, {**b, "content": "y"}, "strict")
    assert not rules.messages_match(USER, {**USER, "reasoning_content": "r"}, "strict")


def test_loose_tool_call_parses_arguments_role_content_only_ignores_the_rest() -> None:
    call = {"id": "c", "function": {"name": "f", "arguments": '{"a": 1, "b": 2}'}}
    spaced = {"id": "c", "function": {"name": "f", "arguments": '{ "b":2,"a":1 }'}}
    a = {"role": "assistant", "content": "", "tool_calls": [call]}
    b = {"role": "assistant", "content": "", "tool_calls": [spaced]}
    assert not rules.messages_match(a, b, "strict")
    assert rules.messages_match(a, b, "loose_tool_call")
    c = {"role": "assistant", "content": "", "reasoning_content": "r"}
    assert rules.messages_match(a, c, "role_content_only")
    assert not rules.messages_match(a, c, "loose_tool_call")


def test_attach_is_the_deepest_prefix_and_the_latest_at_equal_depth() -> None:
    forest = Forest()
    n0 = add(forest, [SYS, USER], "a0", [1, 2], [3])
    n1 = add(forest, [SYS, USER, assistant("a0"), USER], "a1", [1, 2, 3, 4], [5])
    twin = add(forest, [SYS, USER, assistant("a0"), USER], "a1", [1, 2, 3, 4], [5])
    assert (n0, n1, twin) == (0, 1, 2)
    assert forest.parents.tolist() == [-1, 0, 0]
    request = [SYS, USER, assistant("a0"), USER, assistant("a1"), USER]
    assert rules.attach(forest.index, digests_of(request)) == (2, 5)
    # a prefix that ends inside a node's delta attaches above it
    partial = [SYS, USER, assistant("a0"), {"role": "user", "content": "other"}]
    assert rules.attach(forest.index, digests_of(partial)) == (0, 3)
    # nothing matches: a new root
    assert rules.attach(forest.index, digests_of([USER])) == (-1, 0)


# -- the store --------------------------------------------------------------------


def test_a_node_stores_only_its_suffix_and_paths_rebuild() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1, 2], [3, 4])
    add(forest, [SYS, USER, assistant("a0"), USER], "a1", [1, 2, 3, 4, 9], [5])
    # a retry from node 0 with a boundary rule that dropped node 0's last token
    add(forest, [SYS, USER, assistant("a0"), SYS], "b1", [1, 2, 3, 7], [8])
    assert forest.parents.tolist() == [-1, 0, 0]
    assert forest.commons.tolist() == [0, 4, 3]
    assert forest.tokens.tolist() == [1, 2, 3, 4, 9, 5, 7, 8]  # the prefix once
    assert forest.path_tokens(1).tolist() == [1, 2, 3, 4, 9, 5]
    assert forest.path_tokens(2).tolist() == [1, 2, 3, 7, 8]
    tokens, spans = forest.path_arrays(forest.path(2), None)
    assert tokens.tolist() == [1, 2, 3, 7, 8]
    assert spans == [(0, 2, 3), (2, 4, 5)]  # node 0's completion lost its dropped token
    assert forest.path_messages(2) == [
        orjson.dumps(m) for m in (SYS, USER, assistant("a0"), SYS, assistant("b1"))
    ]


def test_records_are_rebuilt_byte_for_byte_with_re_serialised_messages() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1], [2])
    resent = {"role": "assistant", "content": "a0", "refusal": None}  # matches, other bytes
    messages = [SYS, USER, resent, USER]
    k = add(forest, messages, "a1", [1, 2, 3], [4])
    assert forest.parents[k] == 0
    record = orjson.loads(forest.record(k, "/v1/chat/completions"))
    assert record["request"]["messages"] == messages
    assert record["request"]["input_ids"] == [1, 2, 3]
    assert record["request"]["model"] == "m"
    assert record["response"] == {"id": "r-a1", "choices": [{"prompt_token_ids": [1, 2, 3]}]}
    tagged = next(forest.records("/p", [k], None, True))
    assert tagged.startswith(b'{"node_id":1,"parent":0,"timestamp":')


def test_reindex_under_another_matcher_gives_the_same_attach() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1], [2])
    add(forest, [SYS, USER, assistant("a0"), USER], "a1", [1, 2, 3], [4])
    before = dict(forest.index)
    forest.reindex("role_content_only")
    assert forest.index != before
    forest.reindex("strict")
    assert forest.index == before


# -- pickers and train-once ---------------------------------------------------------


def test_drop_retries_drops_a_superseded_leaf_and_keeps_overlapping_ones() -> None:
    # 0 -> 1; retry of node 1 arriving after it was committed: node 2 (seen=2) under 0.
    parents, seen = [-1, 0, 0], [0, 1, 2]
    assert rules.pick("drop_retries", parents, seen, 2) == [2]
    assert rules.pick("all", parents, seen, 2) == [1, 2]
    assert rules.pick("active", parents, seen, 1) == [1]
    # overlapping siblings (both arrived when only node 0 was committed) are kept
    assert rules.pick("drop_retries", [-1, 0, 0], [0, 1, 1], 2) == [1, 2]
    # the n choices of one request: same arrival
    assert rules.pick("drop_retries", [-1, -1, -1, 2], [0, 0, 0, 3], 3) == [0, 1, 3]
    # roots have no parent: a compaction root never supersedes the old path
    assert rules.pick("drop_retries", [-1, 0, -1], [0, 1, 2], 2) == [1, 2]


def test_train_once_gives_a_shared_completion_to_the_lowest_leaf() -> None:
    assert rules.train_once([[0, 1, 2], [0, 1, 3], [4]]) == [
        [True, True, True],
        [False, False, True],
        [True],
    ]


def test_tree_samples_concatenate_kept_leaves_with_offsets_and_masks() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1, 2], [3, 4])
    add(forest, [SYS, USER, assistant("a0"), USER], "a1", [1, 2, 3, 4, 9], [5])
    add(forest, [SYS, USER, assistant("a0"), SYS], "b1", [1, 2, 3, 4, 7], [8], seen=1)
    arrays, meta = tree_samples("s", forest, 3, 2, "drop_retries", SamplesRequest(reward=1.0))
    assert arrays["offsets"].tolist() == [0, 6, 12]
    assert arrays["tokens"].tolist() == [1, 2, 3, 4, 9, 5, 1, 2, 3, 4, 7, 8]
    assert arrays["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    values = arrays["rollout_log_probs"]
    assert np.allclose(values[arrays["loss_mask"] == 1], -0.5)
    assert (values[arrays["loss_mask"] == 0] == 0).all()
    first, second = meta["samples"]
    assert (first["leaf"], first["path"], second["path"]) == (1, [0, 1], [0, 2])
    assert first["turns"] == [[2, 4], [5, 6]] and first["reward"] == 1.0
    assert first["finish_reasons"] == ["stop", "stop"]
    cut, _ = tree_samples("s", forest, 3, 2, "all", SamplesRequest(max_seq_len=5))
    assert cut["offsets"].tolist() == [0, 5, 10]


@pytest.mark.parametrize("matcher", rules.MATCHERS)
def test_prefix_digests_chain_like_node_digests(matcher: str) -> None:
    messages = [SYS, USER, assistant("x")]
    digests, _ = rules.prefix_digests(messages, [orjson.dumps(m) for m in messages], matcher)
    chained = rules.ROOT_DIGEST
    for i, message in enumerate(messages):
        chained = rules.chain(chained, rules.message_digest(message, matcher))
        assert digests[i + 1] == chained


def test_the_memo_is_a_cache_only() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1], [2])
    request = [SYS, USER, assistant("a0"), USER]
    assert len(forest.memo) == 3  # the root's messages, each once
    assert digests_of(request, forest.memo) == digests_of(request)
    # a stale entry could only come from another matcher: reindex rebuilds it
    forest.reindex("role_content_only")
    assert (
        digests_of(request, None)
        != rules.prefix_digests(
            request, [orjson.dumps(m) for m in request], "role_content_only", forest.memo
        )[0]
    )


def test_a_node_row_round_trips_with_its_overrides_and_digests() -> None:
    from rollout_sessions.journal.db import node_head, node_messages, node_write

    forest = Forest()
    add(forest, [SYS, USER], "a0", [1], [2])
    resent = {"role": "assistant", "content": "a0", "refusal": None}
    messages = [SYS, USER, resent, USER]
    message_bytes = [orjson.dumps(m) for m in messages]
    digests, ones = rules.prefix_digests(messages, message_bytes, "strict", forest.memo)
    parent, matched = rules.attach(forest.index, digests)
    own = rules.message_digest(assistant("a1"), "strict")
    write = forest.prepare(
        parent=parent, seen=1, matched=matched, message_bytes=message_bytes,
        assistant=orjson.dumps(assistant("a1")), rest=b"", flags=WITH_INPUT_IDS,
        prompt=ids(1, 2, 3), completion=ids(4), logprobs=array("f", [-1.0]), answer=b"{}",
        cut=1, timestamps=(2.0, 1.0), finish_reason="length", response_id="r",
        weight_version={"v": 1}, cached_tokens=7, digest=rules.chain(digests[-1], own),
        message_digests=[*ones, own],
    )  # fmt: skip
    assert write.overrides == ((2, message_bytes[2]),)
    row = (1, node_head(write, "strict"), write.rest, node_messages(write), write.suffix.tobytes())
    back, matcher = node_write(row)
    assert matcher == "strict"
    for field in ("parent", "seen", "messages", "overrides", "common", "suffix", "prompt_len",
                  "end", "flags", "cut", "timestamps", "finish_reason", "response_id",
                  "weight_version", "cached_tokens", "digest", "message_digests"):  # fmt: skip
        assert getattr(back, field) == getattr(write, field), field
    replayed = Forest()
    replayed.apply(node_write((0, *_row_of(forest, 0)))[0], keep_answer=False)
    replayed.apply(back, keep_answer=False)
    assert replayed.index == {**forest.index, write.digest: 1}
    assert replayed.request_messages(1) == message_bytes


def _row_of(forest: Forest, k: int) -> tuple:
    """Node k of ``forest`` as a journal row (the head, rest, messages, suffix)."""
    from rollout_sessions.journal.db import node_head, node_messages
    from rollout_sessions.trajectory.forest import NodeWrite

    start, stop = forest.msg_starts[k], forest.msg_starts[k + 1]
    write = NodeWrite(
        parent=forest.parents[k], seen=forest.seen[k], messages=tuple(forest.messages[start:stop]),
        overrides=forest.overrides.get(k, ()), common=forest.commons[k], suffix=forest.suffix(k),
        prompt_len=forest.prompt_lens[k], end=forest.ends[k], rest=forest.rests[k],
        flags=forest.flags[k], answer=b"", cut=forest.cuts[k], logprobs=array("f"),
        timestamps=(forest.times[2 * k], forest.times[2 * k + 1]),
        finish_reason=forest.finish[k], response_id=forest.response_ids[k],
        weight_version=forest.weight_versions[k], cached_tokens=forest.cached[k],
        digest=forest.digests[k],
        message_digests=tuple(forest.memo[m] for m in forest.messages[start:stop]),
    )  # fmt: skip
    return node_head(write, "strict"), write.rest, node_messages(write), write.suffix.tobytes()


def test_the_hint_gives_the_same_digests() -> None:
    forest = Forest()
    add(forest, [SYS, USER], "a0", [1], [2])
    request = [SYS, USER, assistant("a0"), USER]
    fresh = [orjson.dumps(m) for m in request]
    plain = rules.prefix_digests(request, fresh, "strict", forest.memo)
    hinted = rules.prefix_digests(request, fresh, "strict", forest.memo, forest.path_messages(0))
    other = [SYS, {"role": "user", "content": "other"}, assistant("a0")]
    diverging = rules.prefix_digests(
        other, [orjson.dumps(m) for m in other], "strict", forest.memo, forest.path_messages(0)
    )
    assert hinted == plain
    assert diverging == rules.prefix_digests(other, [orjson.dumps(m) for m in other], "strict")
