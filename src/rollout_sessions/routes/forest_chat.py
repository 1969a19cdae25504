"""The chat turn in tree mode (``TRAJECTORY=tree``): attach, forward, commit as a node.

The split lock of the linear turn, with the forest's rules:

1. (``chat.chat_completions``) look up, read and check the body, auto-create;
2. under ``session.lock``, briefly: the cap (``MAX_TREE_NODES``, counting
   turns in flight: 409 and no upstream call), the attach node (the deepest
   node whose path messages are a prefix of the request's, found by path
   digests: ``forest_rules``), a truncated attach node (409, no upstream
   call), with TITO the roles of the appended messages (400); the attach
   node becomes the active one;
3. without any lock: with TITO, ``input_ids`` = the attach node's path
   tokens (stored, never re-rendered) + the appended messages' tokens (a new
   root renders whole); the upstream call; every choice validated;
4. under the lock, briefly: unless the session is closing or gone, each
   choice becomes a node under the attach node (whatever was committed
   meanwhile: concurrent turns become siblings, n choices too); without
   TITO, a choice whose tokens do not extend the attach node's path tokens
   is recorded as a new root flagged ``prefix_mismatch``. Journal first.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from blacksheep import Response

from rollout_sessions.routes.turn import (
    SSE_HEADERS,
    SSE_TYPE,
    ChatRequest,
    CheckedAnswer,
    ask,
    client_answer,
    first_difference,
    first_turn_ids,
    is_prefix,
    without_replay,
)
from rollout_sessions.sessions.service import CLOSING, Change
from rollout_sessions.trajectory import forest_rules
from rollout_sessions.trajectory.forest import (
    PREFIX_MISMATCH,
    REPLAY,
    WITH_INPUT_IDS,
    Forest,
    NodeWrite,
)
from rollout_sessions.trajectory.store import cut_prompt_ids
from rollout_sessions.upstream.answer import (
    REPLAY_KEYS,
    ParsedAnswer,
    _completion,
    _message,
    parse_answer,
    sse_body,
    token_array,
)
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import whole
from rollout_sessions.web.errors import ApiError

if TYPE_CHECKING:
    from rollout_sessions.sessions.session import Session
    from rollout_sessions.web.state import AppState


def choices_requested(req: dict[str, Any], trajectory: str) -> int:
    """The request's ``n``; 400 when the mode cannot record it (nothing created)."""
    n = req.get("n")
    if trajectory != "tree":
        if type(n) is int and n > 1:
            raise errors.invalid_chat_request(
                f"n={n} needs TRAJECTORY=tree (--trajectory tree): a linear session "
                f"records one choice per turn"
            )
        return 1
    if n is None:
        return 1
    if type(n) is not int or n < 1:
        raise errors.invalid_chat_request("n must be a positive integer")
    return n


@dataclass(frozen=True, slots=True)
class Choice:
    """One validated choice of an upstream answer, ready to become a node."""

    prompt_ids: array
    completion_ids: array
    logprobs: array
    answer: bytes  # the record's answer (this choice only) without its prompt ids value
    cut: int
    assistant: bytes
    message: dict[str, Any]
    extras: tuple[Any, Any, Any, Any]  # (response id, finish reason, weight_version, cached)
    replay: bool


async def tree_turn(
    state: AppState,
    session_id: str,
    session: Session,
    turn: ChatRequest,
    n: int,
    first_ids: array | None,
    headers: list[tuple[str, str]],
    query: str,
) -> Response:
    settings = state.settings
    tito = state.tito
    matcher = settings.message_matcher
    lock = session.lock
    async with lock:
        if session.closing:
            raise errors.session_not_found(session_id)
        forest = session.traj
        if forest is None:
            forest = session.traj = Forest()  # type: ignore[assignment]
        assert isinstance(forest, Forest)
        cap = settings.max_tree_nodes
        if forest.n_nodes + forest.inflight + n > cap:
            raise errors.tree_node_cap(cap, forest.n_nodes, n)
        hint = forest.path_messages(forest.active) if forest.active >= 0 else ()
        digests = forest_rules.prefix_digests(
            turn.messages, turn.message_bytes, matcher, forest.memo, hint
        )
        parent, matched = forest_rules.attach(forest.index, digests[0])
        if parent >= 0 and forest.truncated(parent):
            raise errors.truncated_not_extendable(parent)
        base = last_assistant = None
        if parent >= 0:
            if tito is not None:
                allowed = settings.allowed_append_roles
                for i in range(matched, len(turn.messages)):
                    role = turn.messages[i].get("role")
                    if role not in allowed:
                        raise errors.append_role_refused(i, role, allowed)
                last_assistant = forest.last_message(parent)
            base = forest.path_tokens(parent)
        seen = forest.n_nodes
        forest.active = parent if parent >= 0 else forest.active
        forest.inflight += n
    try:
        input_ids = None
        if tito is not None:
            if base is None:
                input_ids = first_ids if first_ids is not None else first_turn_ids(tito, turn)
            else:
                input_ids = tito.next_turn(
                    base,
                    last_assistant,  # type: ignore[arg-type]
                    turn.messages[matched:],
                    turn.req.get("tools"),
                    turn.req.get("chat_template_kwargs"),
                    matched,
                )
        answer = await ask(state, session, session_id, turn, input_ids, headers, query)
        if answer.status != 200:
            state.metrics.chat_turns.inc("upstream_status")
            return turn.upstream_refused(answer)
        choices, client = checked_answer(state, turn, answer.body, input_ids, n)

        def prepare(traj: Any) -> Change | str:
            return _prepare(
                state, session_id, traj, forest, parent, matched, seen, digests,
                turn, choices, input_ids, base,
            )  # fmt: skip

        outcome = await state.sessions.record(session_id, session, None, prepare)
    finally:
        forest.inflight -= n
    state.metrics.chat_turns.inc(outcome)
    if outcome == CLOSING and state.sessions.inflight is not None and session.closing:
        # Deleted after its answer came: answered like a turn the DELETE cancelled.
        raise errors.session_not_found(session_id)
    return client


def checked_answer(
    state: AppState, turn: ChatRequest, raw: bytes, input_ids: array | None, n: int
) -> tuple[list[Choice], Response]:
    """Every choice validated (with TITO, its prompt the ``input_ids`` sent), and
    what the client gets, before any lock."""
    try:
        parsed = parse_answer(raw)
        try:
            choices = [_single(parsed)] if n == 1 else _every_choice(parsed)
            for choice in choices:
                if input_ids is not None and choice.prompt_ids != input_ids:
                    raise errors.upstream_ignored_input_ids(
                        len(input_ids),
                        len(choice.prompt_ids),
                        first_difference(input_ids, choice.prompt_ids),
                    )
            client = _client(turn, parsed, client_answer)
        except orjson.JSONEncodeError as exc:
            raise errors.upstream_malformed(f"the answer cannot be written again ({exc})") from None
    except ApiError:
        state.metrics.upstream_errors.inc("malformed")
        raise
    return choices, client


def _single(parsed: ParsedAnswer) -> Choice:
    """The answer of one choice (the linear turn's fast path)."""
    answer, cut = cut_prompt_ids(parsed.raw, parsed.prompt_ids, lambda: parsed.response)
    return Choice(
        parsed.prompt_ids,
        parsed.completion_ids,
        parsed.logprobs,
        answer,
        cut,
        orjson.dumps(parsed.message),
        parsed.message,
        parsed.extras,
        parsed.replay,
    )


def _every_choice(parsed: ParsedAnswer) -> list[Choice]:
    """Each choice of an answer with several, validated like ``choices[0]``; each
    node's record holds its own choice only (``choices: [that choice]``)."""
    response = parsed.response
    choices = response["choices"]
    out = []
    for i, choice in enumerate(choices):
        if type(choice) is not dict:
            raise errors.upstream_malformed(f"choices[{i}] is not an object")
        message = _message(choice.get("message"))
        meta = choice.get("meta_info")
        if type(meta) is not dict:
            raise errors.upstream_malformed(f"choices[{i}] has no meta_info")
        completion, logprobs = _completion(
            meta.get("output_token_logprobs"), meta.get("completion_tokens")
        )
        prompt = choice.get("prompt_token_ids")
        if prompt is None:  # a backend may send the shared prompt once
            prompt = choices[0].get("prompt_token_ids")
            choice = {**choice, "prompt_token_ids": prompt}
        if type(prompt) is not list:
            raise errors.upstream_malformed(f"choices[{i}].prompt_token_ids is missing")
        prompt_ids = token_array(prompt, f"choices[{i}].prompt_token_ids")
        own = {**response, "choices": [choice]}
        text = orjson.dumps(own)
        answer, cut = cut_prompt_ids(text, prompt_ids, lambda own=own: own)
        finish = choice.get("finish_reason")
        if finish is None and type(meta.get("finish_reason")) is dict:
            finish = meta["finish_reason"].get("type")
        extras = (response.get("id"), finish, meta.get("weight_version"), meta.get("cached_tokens"))
        replay = any(key in meta for key in REPLAY_KEYS)
        out.append(
            Choice(
                prompt_ids,
                completion,
                logprobs,
                answer,
                cut,
                orjson.dumps(message),
                message,
                extras,
                replay,
            )  # fmt: skip
        )
    return out


def _client(turn: ChatRequest, parsed: ParsedAnswer, single: Any) -> Response:
    """What the client gets: every choice (routing-replay payloads removed)."""
    if not turn.stream or len(parsed.response["choices"]) == 1:
        return single(turn, parsed)
    response = without_replay(parsed.response)
    events = []
    for i, choice in enumerate(response["choices"]):
        body = sse_body({**response, "choices": [choice]})
        chunk = orjson.loads(body[len(b"data: ") : body.index(b"\n\n")])
        chunk["choices"][0]["index"] = i
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return Response(200, list(SSE_HEADERS), whole(SSE_TYPE, b"".join(events)))


def _prepare(
    state: AppState,
    session_id: str,
    traj: Any,
    forest: Forest,
    parent: int,
    matched: int,
    seen: int,
    digests: tuple[list[bytes], list[bytes]],
    turn: ChatRequest,
    choices: list[Choice],
    input_ids: array | None,
    base: array | None,
) -> str:
    """Step 4, under the lock (``Sessions.record``): each choice a node, or why not."""
    if traj is not forest:
        return CLOSING
    matcher = state.settings.message_matcher
    request_digest = digests[0][-1]
    now = time.time()
    writes: list[NodeWrite] = []
    for choice in choices:
        flags = WITH_INPUT_IDS if input_ids is not None else 0
        if choice.replay:
            flags |= REPLAY
        node_parent, node_matched = parent, matched
        if parent >= 0 and input_ids is None:
            probe = CheckedAnswer(
                choice.prompt_ids,
                choice.completion_ids,
                choice.logprobs,
                b"",
                0,
                b"",
                None,  # type: ignore[arg-type]
            )
            if not is_prefix(base, probe):  # type: ignore[arg-type]
                # The tokens the model saw are kept: a new root, flagged.
                node_parent, node_matched = -1, 0
                flags |= PREFIX_MISMATCH
        response_id, finish, weight_version, cached = choice.extras
        own = forest_rules.message_digest(choice.message, matcher)
        writes.append(
            forest.prepare(
                parent=node_parent,
                seen=seen,
                matched=node_matched,
                message_bytes=turn.message_bytes,
                assistant=choice.assistant,
                rest=turn.rest,
                flags=flags,
                prompt=choice.prompt_ids,
                completion=choice.completion_ids,
                logprobs=choice.logprobs,
                answer=choice.answer,
                cut=choice.cut,
                timestamps=(now, turn.arrived),
                finish_reason=finish if type(finish) is str else None,
                response_id=response_id if type(response_id) is str else None,
                weight_version=weight_version,
                cached_tokens=cached,
                digest=forest_rules.chain(request_digest, own),
                message_digests=[*digests[1], own],
                base=base if node_parent >= 0 else None,
            )
        )
    return state.sessions.forest_change(session_id, forest, writes, matcher)
