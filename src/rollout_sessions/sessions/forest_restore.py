"""Start-up in tree mode: a session's forest replayed from the journal's nodes.

A session the journal holds as linear turns (recorded with
``TRAJECTORY=linear``) becomes a chain of nodes, once, at start-up: each turn
a node under the one before, its answer and logprobs moved to the node's row
on disk (the turns' rows go), so the forest reads as if it had been recorded
in tree mode. The other way is refused: a forest need not be linear.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import orjson

from rollout_sessions.config import Settings
from rollout_sessions.trajectory import forest_rules
from rollout_sessions.trajectory.forest import REPLAY, WITH_INPUT_IDS, Forest, NodeWrite
from rollout_sessions.trajectory.samples import turn_info
from rollout_sessions.trajectory.store import LOGPROB_TYPECODE, Trajectory, TurnWrite

if TYPE_CHECKING:
    from rollout_sessions.journal.writer import Journal


def restore_forest(
    settings: Settings,
    sid: str,
    turns: list[TurnWrite] | None,
    nodes: list[tuple[NodeWrite, str]] | None,
    journal: Journal | None = None,
    key: bytes = b"",
) -> Forest:
    """The forest of a session, node by node (answers and logprobs stay on disk)."""
    if settings.trajectory != "tree":
        raise ValueError(
            f"session {sid} was recorded with TRAJECTORY=tree; start with --trajectory tree "
            f"(or another DATA_DIR)"
        )
    matcher = settings.message_matcher
    if turns:
        assert journal is not None and not nodes
        return _from_linear(turns, matcher, journal, key)
    forest = Forest()
    stale = False
    for write, written_with in nodes or ():
        forest.apply(write, keep_answer=False)
        stale = stale or written_with != matcher
    if stale:  # digests of another MESSAGE_MATCHER: computed again
        forest.reindex(matcher)
    return forest


def _from_linear(turns: list[TurnWrite], matcher: str, journal: Journal, key: bytes) -> Forest:
    """A linear trajectory as a chain of nodes, written to the journal in place of its turns."""
    traj = Trajectory()
    for write in turns:
        traj.apply(write, keep_answer=False)
    answers = journal.read_turn_answers(key)
    forest = Forest()
    writes = []
    for k, turn in enumerate(traj.turns):
        request = traj.request_messages(k)
        assistant = traj.messages[turn.n_messages]
        parsed = [orjson.loads(m) for m in request]
        paths, ones = forest_rules.prefix_digests(parsed, request, matcher, forest.memo)
        own = forest_rules.message_digest(orjson.loads(assistant), matcher)
        checkpoint = traj.checkpoint(k + 1)
        info = turn_info(answers[k], turn.cut, with_replay=True)
        response_id = info.response_id
        write = forest.prepare(
            parent=k - 1,
            seen=k,
            matched=traj.message_end(k - 1) if k else 0,
            message_bytes=request,
            assistant=assistant,
            rest=turn.rest,
            flags=(WITH_INPUT_IDS if turn.with_input_ids else 0) | (REPLAY if info.replay else 0),
            prompt=checkpoint[: turn.prompt_len],
            completion=checkpoint[turn.prompt_len :],
            logprobs=array(LOGPROB_TYPECODE),  # on disk
            answer=b"",
            cut=turn.cut,
            timestamps=(turn.timestamp, turn.request_timestamp),
            finish_reason=info.finish_reason if type(info.finish_reason) is str else None,
            response_id=response_id if type(response_id) is str else None,
            weight_version=info.weight_version,
            cached_tokens=info.cached_tokens,
            digest=forest_rules.chain(paths[-1], own),
            message_digests=[*ones, own],
        )
        forest.apply(write, keep_answer=False)
        writes.append(write)
    journal.turns_to_nodes(key, writes, matcher)
    return forest
