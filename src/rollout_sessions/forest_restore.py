"""Start-up in tree mode: a session's forest replayed from the journal's nodes."""

from __future__ import annotations

from rollout_sessions.config import Settings
from rollout_sessions.forest import Forest, NodeWrite
from rollout_sessions.store import TurnWrite


def restore_forest(
    settings: Settings,
    sid: str,
    turns: list[TurnWrite] | None,
    nodes: list[tuple[NodeWrite, str]] | None,
) -> Forest:
    """The forest of a session, node by node (answers and logprobs stay on disk).

    A journal holds a session either as linear turns or as nodes, as the mode
    it was recorded in; the other mode cannot read it, and says so."""
    if settings.trajectory != "tree":
        raise ValueError(
            f"session {sid} was recorded with TRAJECTORY=tree; start with --trajectory tree "
            f"(or another DATA_DIR)"
        )
    if turns:
        raise ValueError(
            f"session {sid} was recorded with TRAJECTORY=linear; start with --trajectory "
            f"linear (or another DATA_DIR)"
        )
    forest = Forest()
    matcher = settings.message_matcher
    stale = False
    for write, written_with in nodes or ():
        forest.apply(write, keep_answer=False)
        stale = stale or written_with != matcher
    if stale:  # digests of another MESSAGE_MATCHER: computed again
        forest.reindex(matcher)
    return forest
