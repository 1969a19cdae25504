"""A session's trajectory, kept once and compactly: memory linear in its length.

What a turn sends and receives is mostly history: the request repeats every
earlier message, the answer repeats every earlier token in its
``prompt_token_ids``. The store keeps each thing once:

- ``tokens``: one int32 buffer, the latest checkpoint (prompt + completion
  ids of the last turn). Every earlier checkpoint is a prefix of it, except
  where a boundary rule dropped a checkpoint's last token; those few tokens
  are kept with their turn (``Turn.tail``);
- ``messages``: each message once, as canonical JSON bytes, append-only; a
  turn's request messages are the first ``n_messages`` of them (a turn whose
  messages a later turn re-serialised differently keeps its own list of
  references, ``Turn.own_messages``);
- ``logprobs``: float32, the completion's logprobs of each turn, in order;
- per turn, only what is new: the request's other fields (shared with the
  previous turn when equal), and the answer without its
  ``prompt_token_ids`` value, compressed (zstd), with the offset where that
  value goes back.

``record(k)`` rebuilds turn k's record byte for byte: the request as it was
forwarded (messages and ``input_ids`` from the buffers) and the upstream's
answer with its ``prompt_token_ids`` re-inserted (from the token buffer).
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import zstandard

TOKEN_TYPECODE = "i"  # token ids are stored as int32
LOGPROB_TYPECODE = "f"  # logprobs as float32
PROMPT_KEY = b'"prompt_token_ids":'  # as compact JSON writes the key
_ZSTD_LEVEL = 1  # the fastest level: answers are JSON and shrink well even so
_compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
_decompressor = zstandard.ZstdDecompressor()


def ids_json(ids: array) -> bytes:
    """Token ids as compact JSON (``[1,2,3]``), without a Python int per id."""
    return orjson.dumps(np.frombuffer(ids, dtype=np.int32), option=orjson.OPT_SERIALIZE_NUMPY)


def prompt_id_values(raw: bytes) -> Iterator[int]:
    """Where the value of each ``"prompt_token_ids":`` key of the JSON ``raw`` starts.

    A key's opening quote is structural when no backslash precedes it: inside
    a JSON string every quote is escaped. So every real key is found
    (duplicates too) and no string that merely contains the text is.
    """
    at = raw.find(PROMPT_KEY)
    while at > 0:
        if raw[at - 1] != 0x5C:  # 0x5C: backslash
            yield at + len(PROMPT_KEY)
        at = raw.find(PROMPT_KEY, at + 1)


def cut_prompt_ids(
    raw: bytes, prompt: array, load: Callable[[], dict[str, Any]]
) -> tuple[bytes, int]:
    """The answer without the value of ``choices[0].prompt_token_ids``, and where it was.

    The value is found as sent when the upstream wrote it as compact JSON
    (``prompt_id_values``); otherwise the parsed answer
    (``load()``) is written again with the value left out. Either way, inserting
    ``ids_json(prompt)`` at the offset gives an answer equal to the original.
    """
    value = ids_json(prompt)
    for start in prompt_id_values(raw):
        if raw.startswith(value, start):
            return raw[:start] + raw[start + len(value) :], start
    response = load()
    choice = response["choices"][0]
    marker = "\x00prompt_token_ids\x00"
    saved = choice["prompt_token_ids"]
    choice["prompt_token_ids"] = marker
    try:
        text = orjson.dumps(response)
    finally:
        choice["prompt_token_ids"] = saved
    hole = orjson.dumps(marker)
    start = text.index(PROMPT_KEY + hole) + len(PROMPT_KEY)
    return text[:start] + text[start + len(hole) :], start


@dataclass(frozen=True, slots=True)
class TurnWrite:
    """One turn to record, relative to the state after its first ``keep`` turns:
    what the store applies and the journal keeps (linear in what is new)."""

    keep: int  # turns it builds on; later ones are rolled back
    exact: int  # stored messages kept as they are
    messages: tuple[bytes, ...]  # then these: its request's from `exact` on, and the answer's
    n_messages: int  # its request's messages
    common: int  # tokens of the kept checkpoint kept as they are
    suffix: array  # then these: the rest of its checkpoint
    prompt_len: int
    end: int  # its checkpoint's length
    rest: bytes
    with_input_ids: bool
    answer: bytes  # the answer without its prompt ids value, uncompressed
    cut: int
    logprobs: array  # float32, of its completion
    timestamps: tuple[float, float]  # (recorded, arrived)
    # (finish_reason, weight_version, cached_tokens, has a routing-replay payload):
    # what the samples export reads of the answer, without decompressing it
    extras: tuple[Any, Any, Any, bool] | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """What one recorded turn adds to the store.

    Frozen: a commit that must change an earlier turn replaces it, so a
    snapshot (a shallow copy of the list) never changes under a reader.
    """

    timestamp: float
    request_timestamp: float
    rest: bytes  # the forwarded body's fields but messages and input_ids, without braces
    n_messages: int  # its request messages: the store's first n_messages
    prompt_len: int  # its prompt: tokens[:prompt_len]
    end: int  # its checkpoint: tokens[:end] (prompt + completion)
    with_input_ids: bool  # the request carried input_ids (token-in, token-out)
    answer: bytes | None  # zstd of the answer without its prompt ids value (None: on disk)
    cut: int  # where that value goes back
    logprob_start: int  # its completion's logprobs: logprobs[logprob_start:]
    stable: int = -1  # how much of its checkpoint is still in tokens (end until overwritten)
    tail: array | None = None  # its checkpoint's tokens past `stable`, once overwritten
    own_messages: list[bytes] | None = None  # its messages, once the store's were rewritten
    extras: tuple[Any, Any, Any, bool] | None = None  # TurnWrite.extras (None: not known)


class Trajectory:
    """The store of one session. Mutate only under the session lock."""

    __slots__ = ("tokens", "messages", "logprobs", "turns", "version")

    def __init__(self) -> None:
        self.tokens = array(TOKEN_TYPECODE)
        self.messages: list[bytes] = []
        self.logprobs = array(LOGPROB_TYPECODE)
        self.turns: list[Turn] = []
        self.version = 0  # bumped by every commit: a plan is stale once it moves

    # -- reading -----------------------------------------------------------------

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def message(self, index: int) -> dict[str, Any]:
        return orjson.loads(self.messages[index])

    def message_end(self, k: int) -> int:
        """Message index just after turn ``k``'s generated assistant message."""
        return self.turns[k].n_messages + 1

    def checkpoint(self, turns: int) -> array:
        """The checkpoint after the first ``turns`` turns (a copy; empty for 0)."""
        if turns == 0:
            return array(TOKEN_TYPECODE)
        turn = self.turns[turns - 1]
        stable = turn.end if turn.stable < 0 else turn.stable
        out = self.tokens[:stable]
        if turn.tail is not None:
            out.extend(turn.tail)
        return out

    def prompt_ids(self, k: int) -> array:
        turn = self.turns[k]
        return self.checkpoint(k + 1)[: turn.prompt_len]

    def request_messages(self, k: int) -> list[bytes]:
        turn = self.turns[k]
        if turn.own_messages is not None:
            return turn.own_messages
        return self.messages[: turn.n_messages]

    def record(self, k: int, path: str, answer: bytes | None = None) -> bytes:
        """Turn ``k``'s record as JSON, rebuilt from the store (``answer``: the
        compressed answer, when the journal keeps it instead of the store).

        The JSON object ``{"timestamp", "request_timestamp", "method", "path",
        "status_code", "request", "response"}``, compact, written in one join:
        a record is ~100-250 KB, and every intermediate copy of it (the
        request, the answer with its prompt ids back, the object around them)
        cost as much as the join itself.
        """
        turn = self.turns[k]
        prompt = ids_json(self.prompt_ids(k))
        text = memoryview(_decompressor.decompress(answer if answer is not None else turn.answer))
        parts: list[bytes | memoryview] = [
            b'{"timestamp":',
            orjson.dumps(turn.timestamp),
            b',"request_timestamp":',
            orjson.dumps(turn.request_timestamp),
            b',"method":"POST","path":',
            orjson.dumps(path),
            b',"status_code":200,"request":{',
        ]
        if turn.rest:
            parts += [turn.rest, b","]
        parts.append(b'"messages":[')
        for i, message in enumerate(self.request_messages(k)):
            if i:
                parts.append(b",")
            parts.append(message)
        parts.append(b"]")
        if turn.with_input_ids:
            parts += [b',"input_ids":', prompt]
        parts += [b'},"response":', text[: turn.cut], prompt, text[turn.cut :], b"}"]
        return b"".join(parts)

    def snapshot(self) -> Trajectory:
        """A copy of what the records are rebuilt from, which later commits cannot
        change (for a GET streamed over awaits). Cheap: the buffers' bytes are
        copied, messages and turns (immutable) are shared."""
        copy = Trajectory()
        copy.tokens = self.tokens[:]
        copy.messages = list(self.messages)
        copy.turns = list(self.turns)
        copy.version = self.version
        return copy

    def snapshot_with_logprobs(self) -> Trajectory:
        """``snapshot`` plus the logprobs the store keeps (memory only)."""
        copy = self.snapshot()
        copy.logprobs = self.logprobs[:]
        return copy

    def records(self, path: str, answers: list[bytes] | None = None) -> Iterator[bytes]:
        for k in range(len(self.turns)):
            yield self.record(k, path, answers[k] if answers is not None else None)

    # -- writing --------------------------------------------------------------------

    def prepare(
        self,
        keep: int,
        exact: int,
        message_bytes: list[bytes],
        assistant: bytes,
        rest: bytes,
        with_input_ids: bool,
        prompt: array,
        completion: array,
        logprobs: array,
        answer: bytes,
        cut: int,
        timestamps: tuple[float, float],
        extras: tuple[Any, Any, Any, bool] | None = None,
    ) -> TurnWrite:
        """A turn on top of the first ``keep`` turns (the rest rolled back), as a
        write that ``apply`` carries out and the journal can replay. Pure.

        ``exact``: how many stored messages ``message_bytes`` repeats byte for
        byte. ``answer``/``cut``: the answer without its prompt ids (see
        ``cut_prompt_ids``).
        """
        base_messages = self.message_end(keep - 1) if keep else 0
        exact = min(exact, base_messages)
        checkpoint = prompt + completion
        common = _common_prefix(self.checkpoint(keep), checkpoint)
        return TurnWrite(
            keep=keep,
            exact=exact,
            messages=(*message_bytes[exact:], assistant),
            n_messages=len(message_bytes),
            common=common,
            suffix=checkpoint[common:],
            prompt_len=len(prompt),
            end=len(checkpoint),
            rest=rest,
            with_input_ids=with_input_ids,
            answer=answer,
            cut=cut,
            logprobs=logprobs,
            timestamps=timestamps,
            extras=_shared(extras),
        )

    def apply(self, write: TurnWrite, keep_answer: bool = True) -> None:
        """Carry out a prepared turn (live, or replayed from the journal).

        ``keep_answer``: keep the answer (compressed) and the logprobs in
        memory; the journal keeps them on disk instead.
        """
        turns = self.turns
        if write.keep < len(turns):
            self._roll_back(write.keep)
        self._replace_tokens(write.common, write.suffix)
        self._replace_messages(write.exact, write.messages)
        rest = write.rest
        if turns and turns[-1].rest == rest:
            rest = turns[-1].rest  # tools and sampling fields rarely change: share them
        # A copy of exact size: zstandard's result keeps its worst-case allocation.
        answer = bytes(memoryview(_compressor.compress(write.answer))) if keep_answer else None
        turns.append(
            Turn(
                timestamp=write.timestamps[0],
                request_timestamp=write.timestamps[1],
                rest=rest,
                n_messages=write.n_messages,
                prompt_len=write.prompt_len,
                end=write.end,
                with_input_ids=write.with_input_ids,
                answer=answer,
                cut=write.cut,
                logprob_start=len(self.logprobs),
                extras=write.extras,
            )
        )
        if keep_answer:
            self.logprobs.extend(write.logprobs)
        self.version += 1

    def _roll_back(self, keep: int) -> None:
        """Back to the state right after turn ``keep`` - 1."""
        turns = self.turns
        del self.logprobs[turns[keep].logprob_start :]
        del turns[keep:]
        del self.messages[self.message_end(keep - 1) if keep else 0 :]
        checkpoint = self.checkpoint(keep)
        del self.tokens[:]
        self.tokens.extend(checkpoint)
        if keep and turns[-1].stable >= 0:  # its checkpoint is whole again
            turns[-1] = dataclasses.replace(turns[-1], stable=-1, tail=None)

    def _replace_tokens(self, common: int, suffix: array) -> None:
        tokens = self.tokens
        turns = self.turns
        for k, turn in enumerate(turns):
            stable = turn.end if turn.stable < 0 else turn.stable
            if stable > common:
                # A boundary rule dropped this checkpoint's end: keep what is overwritten.
                lost = tokens[common:stable]
                tail = lost if turn.tail is None else lost + turn.tail
                turns[k] = dataclasses.replace(turn, stable=common, tail=tail)
        del tokens[common:]
        tokens.extend(suffix)

    def _replace_messages(self, exact: int, messages: tuple[bytes, ...]) -> None:
        stored = self.messages
        if exact < len(stored):
            turns = self.turns
            for k, turn in enumerate(turns):
                if turn.n_messages > exact and turn.own_messages is None:
                    turns[k] = dataclasses.replace(turn, own_messages=stored[: turn.n_messages])
            del stored[exact:]
        # Copies of exact size: orjson's output keeps its whole write buffer
        # (32 KiB at least) allocated, a message's bytes are often a tenth of that.
        stored.extend(bytes(memoryview(m)) for m in messages)

    # -- training export --------------------------------------------------------------

    def sample_arrays(
        self, logprobs: list[array] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
        """``(tokens int32, loss_mask uint8, rollout_log_probs float32, turns)``.

        ``turns`` holds each turn's ``[completion_start, completion_end)`` in
        ``tokens``. The mask is 1 there: on each turn's generated tokens still
        in the trajectory (a completion token a boundary rule dropped is not
        trained on).
        """
        tokens = np.frombuffer(self.tokens, dtype=np.int32).copy()
        mask = np.zeros(len(tokens), dtype=np.uint8)
        out = np.zeros(len(tokens), dtype=np.float32)
        spans = []
        for k, turn in enumerate(self.turns):
            stable = turn.end if turn.stable < 0 else turn.stable
            start, stop = turn.prompt_len, min(stable, len(tokens))
            if logprobs is not None:
                source = np.frombuffer(logprobs[k], dtype=np.float32)
            else:
                source = np.frombuffer(self.logprobs, dtype=np.float32)[turn.logprob_start :]
            mask[start:stop] = 1
            out[start:stop] = source[: stop - start]
            spans.append([start, stop])
        return tokens, mask, out, spans


_EXTRAS: dict[tuple[Any, ...], Any] = {}


def _shared(extras: tuple[Any, Any, Any, bool] | None) -> tuple[Any, Any, Any, bool] | None:
    """One object per distinct value (nearly every turn says the same: a few
    finish reasons, one weight version), so a turn keeps a reference only."""
    if extras is None or len(_EXTRAS) >= 4096:
        return extras
    key = tuple((type(v), v) for v in extras)  # 1, 1.0 and True are equal, not alike
    try:
        return _EXTRAS.setdefault(key, extras)
    except TypeError:  # an unhashable value (a JSON object as weight_version)
        return extras


def _common_prefix(a: array, b: array) -> int:
    """Length of the longest common prefix of two int32 arrays."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    diff = np.frombuffer(a, np.int32)[:n] != np.frombuffer(b, np.int32)[:n]
    return int(np.argmax(diff))
