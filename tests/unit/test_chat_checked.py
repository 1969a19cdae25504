"""What a chat turn keeps of the upstream answer once it is checked.

With the journal on, a turn awaits its commit holding its ``CheckedAnswer``;
64 turns in flight that each held the parsed answer (thousands of dicts and
lists) kept the cyclic GC's young generation over its threshold, and
collections cost ~0.5 ms of server CPU per turn. What is kept must be bytes
and arrays, which the GC does not track.
"""

from __future__ import annotations

import gc
from types import ModuleType
from typing import Any

from storekit import answer_json

from rollout_sessions.routes.turn import ChatRequest, checked_answer

COMPLETION = list(range(800))


def tracked_reachable(root: Any) -> int:
    """How many GC-tracked objects ``root`` keeps alive (itself included), not
    counting classes and modules (an instance refers to its class, and from
    there everything is reachable)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type | ModuleType):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_a_checked_answer_keeps_none_of_the_parsed_answer() -> None:
    raw = answer_json(list(range(300)), COMPLETION, {"role": "assistant", "content": "w " * 800})
    turn = ChatRequest(b'{"messages":[{"role":"user","content":"hi"}]}', 0.0)
    state: Any = None  # only read for the metrics of a malformed answer
    checked = checked_answer(state, turn, raw, None)
    assert list(checked.completion_ids) == COMPLETION
    assert len(checked.logprobs) == len(COMPLETION)
    # The parsed answer alone is more than 800 lists (one per completion token).
    assert tracked_reachable(checked) < 50


def test_the_check_itself_sees_a_parsed_answer() -> None:
    # The measure above is not blind: a parsed answer counts as what it is.
    parsed: Any = {"held": [[t, -0.5] for t in COMPLETION]}
    assert tracked_reachable(parsed) > len(COMPLETION)
