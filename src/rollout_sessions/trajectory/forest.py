"""A session as a forest of nodes (``TRAJECTORY=tree``): memory linear in what is new.

Every recorded generation is a node, numbered in commit order (0, 1, ...).
A node's *path* is root to node; its *path messages* are its ancestors'
deltas then its own, its *path tokens* its parent's path tokens (the first
``common`` of them) then its own suffix. A node stores only what is new in it:

- its delta: the request's messages past its parent's path, then the
  generated assistant message (canonical JSON bytes, in one list shared by
  all nodes, ``messages[msg_starts[k]:msg_starts[k + 1]]``);
- its token suffix (``tokens[tok_starts[k]:tok_starts[k + 1]]``, one int32
  buffer for the forest): the prompt ids past the shared prefix and the
  completion ids;
- its completion's logprobs (float32, one buffer) and its answer without
  the ``prompt_token_ids`` value, zstd-compressed (both on disk instead when
  the journal keeps them), with the offset where that value goes back;
- its request's other fields (shared with its parent's when equal), and
  request messages the client re-serialised differently from the stored
  path (``overrides``, rare), so that a record is rebuilt byte for byte.

Per node the numbers live in typed arrays (columns), not in an object per
node. The shared prefix is stored once, whatever the number of branches.

The store is append-only: a node never changes once applied, so a reader
that fixed the node count (``n``) sees a consistent forest across awaits.
Mutate only under the session lock.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import zstandard

from rollout_sessions.trajectory import forest_rules
from rollout_sessions.trajectory.store import (
    LOGPROB_TYPECODE,
    TOKEN_TYPECODE,
    _common_prefix,
    ids_json,
)

_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()

# Node flags
WITH_INPUT_IDS = 1
PREFIX_MISMATCH = 2
REPLAY = 4  # its answer carries routing-replay payloads


@dataclass(frozen=True, slots=True)
class NodeWrite:
    """One node to add: what ``Forest.apply`` carries out and the journal keeps."""

    parent: int  # -1: a root
    seen: int  # nodes the session had committed when its request arrived
    messages: tuple[bytes, ...]  # its delta: request messages past the parent's path, then its own
    overrides: tuple[tuple[int, bytes], ...]  # (path index, request bytes) where they differ
    common: int  # of the parent's path tokens, kept as they are
    suffix: array  # then these: the rest of its prompt, and its completion
    prompt_len: int
    end: int  # its path tokens' length
    rest: bytes
    flags: int
    answer: bytes  # the answer without its prompt ids value, uncompressed
    cut: int
    logprobs: array
    timestamps: tuple[float, float]  # (committed, arrived)
    finish_reason: str | None
    response_id: str | None
    weight_version: Any
    cached_tokens: Any
    digest: bytes  # its path messages' digest (forest_rules.chain)
    message_digests: tuple[bytes, ...] = ()  # of its delta's messages (the attach memo)


class Forest:
    """The nodes of one session (see the module docstring)."""

    __slots__ = (
        "parents",
        "seen",
        "commons",
        "prompt_lens",
        "ends",
        "tokens",
        "tok_starts",
        "messages",
        "msg_starts",
        "logprobs",
        "lp_starts",
        "cuts",
        "flags",
        "rests",
        "answers",
        "overrides",
        "finish",
        "response_ids",
        "weight_versions",
        "cached",
        "times",
        "digests",
        "index",
        "memo",
        "active",
        "inflight",
    )

    def __init__(self) -> None:
        self.parents = array("i")
        self.seen = array("i")
        self.commons = array("i")
        self.prompt_lens = array("i")
        self.ends = array("i")
        self.tokens = array(TOKEN_TYPECODE)
        self.tok_starts = array("q", [0])
        self.messages: list[bytes] = []
        self.msg_starts = array("i", [0])
        self.logprobs = array(LOGPROB_TYPECODE)
        self.lp_starts = array("q", [0])
        self.cuts = array("i")
        self.flags = array("B")
        self.rests: list[bytes] = []
        self.answers: list[bytes | None] = []
        self.overrides: dict[int, tuple[tuple[int, bytes], ...]] = {}
        self.finish: list[str | None] = []
        self.response_ids: list[str | None] = []
        self.weight_versions: list[Any] = []
        self.cached: list[Any] = []
        self.times = array("d")  # (committed, arrived) per node
        self.digests: list[bytes] = []
        self.index: dict[bytes, int] = {}  # path digest -> latest node with that path
        # A stored message's bytes -> its digest (keys are the stored bytes objects).
        self.memo: dict[bytes, bytes] = {}
        self.active = -1  # the node committed or attached to last
        self.inflight = 0  # nodes of turns between attach and commit (the cap counts them)

    # -- reading ------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    def path(self, k: int) -> list[int]:
        return forest_rules.path(self.parents, k)

    def delta(self, k: int) -> list[bytes]:
        return self.messages[self.msg_starts[k] : self.msg_starts[k + 1]]

    def suffix(self, k: int) -> array:
        return self.tokens[self.tok_starts[k] : self.tok_starts[k + 1]]

    def path_tokens(self, k: int) -> array:
        out = array(TOKEN_TYPECODE)
        if k < 0:
            return out
        tokens, starts, commons = self.tokens, self.tok_starts, self.commons
        for node in self.path(k):
            del out[commons[node] :]
            out += tokens[starts[node] : starts[node + 1]]
        return out

    def path_messages(self, k: int) -> list[bytes]:
        """The path's messages as stored (each node's delta, root first)."""
        out: list[bytes] = []
        for node in self.path(k):
            out += self.delta(node)
        return out

    def last_message(self, k: int) -> dict[str, Any]:
        """Node k's generated assistant message."""
        return orjson.loads(self.messages[self.msg_starts[k + 1] - 1])

    def request_messages(self, k: int) -> list[bytes]:
        """Node k's request messages, as they were forwarded."""
        out = self.path_messages(k)
        out.pop()  # its own assistant message
        for i, text in self.overrides.get(k, ()):
            out[i] = text
        return out

    def truncated(self, k: int) -> bool:
        return self.finish[k] == "length"

    def record(
        self,
        k: int,
        path: str,
        answer: bytes | None = None,
        tokens: array | None = None,
        messages: list[bytes] | None = None,
    ) -> bytes:
        """Node k's record as JSON, rebuilt byte for byte (the linear store's shape;
        ``answer``: the compressed answer when the journal keeps it; ``tokens``
        and ``messages``: its path tokens and path messages, when the caller has
        them)."""
        if tokens is None:
            tokens = self.path_tokens(k)
        if messages is None:
            messages = self.path_messages(k)
        prompt = ids_json(tokens[: self.prompt_lens[k]])
        compressed = answer if answer is not None else self.answers[k]
        text = memoryview(_decompressor.decompress(compressed))
        cut = self.cuts[k]
        rest = self.rests[k]
        request = messages[:-1]  # but its own assistant message
        for i, own in self.overrides.get(k, ()):
            request[i] = own
        parts: list[bytes | memoryview] = [
            b'{"timestamp":',
            orjson.dumps(self.times[2 * k]),
            b',"request_timestamp":',
            orjson.dumps(self.times[2 * k + 1]),
            b',"method":"POST","path":',
            orjson.dumps(path),
            b',"status_code":200,"request":{',
        ]
        if rest:
            parts += [rest, b","]
        parts += [b'"messages":[', b",".join(request), b"]"]
        if self.flags[k] & WITH_INPUT_IDS:
            parts += [b',"input_ids":', prompt]
        parts += [b'},"response":', text[:cut], prompt, text[cut:], b"}"]
        return b"".join(parts)

    def records(
        self, path: str, nodes: list[int], answers: dict[int, bytes] | None, tagged: bool
    ) -> Iterator[bytes]:
        """The records of ``nodes``; ``tagged``: each with ``node_id`` and ``parent`` first.

        Along a path (each node the child of the one before: the active path)
        the path tokens and messages are carried from record to record, so
        reading a path costs what it holds, not its length squared."""
        tokens: array | None = None
        messages: list[bytes] | None = None
        previous = -1
        for k in nodes:
            parent = self.parents[k]
            if previous >= 0 and parent == previous and tokens is not None:
                del tokens[self.commons[k] :]
                tokens += self.suffix(k)
                messages = [*messages, *self.delta(k)]  # type: ignore[misc]
            else:
                tokens, messages = self.path_tokens(k), self.path_messages(k)
            previous = k
            record = self.record(
                k, path, answers[k] if answers is not None else None, tokens, messages
            )
            if tagged:
                up = b"null" if parent < 0 else b"%d" % parent
                head = b'{"node_id":%d,"parent":%s,' % (k, up)
                record = head + record[1:]
            yield record

    def node_info(self, k: int) -> dict[str, Any]:
        parent = self.parents[k]
        info = {
            "id": k,
            "parent": parent if parent >= 0 else None,
            "num_tokens": self.ends[k],
            "completion_span": [self.prompt_lens[k], self.ends[k]],
            "finish_reason": self.finish[k],
            "response_id": self.response_ids[k],
            "weight_version": self.weight_versions[k],
            "cached_tokens": self.cached[k],
            "committed_at": self.times[2 * k],
        }
        if self.flags[k] & PREFIX_MISMATCH:
            info["prefix_mismatch"] = True
        return info

    def tree(self, n: int | None = None, active: int | None = None) -> dict[str, Any]:
        """``metadata.tree`` of the first ``n`` nodes."""
        n = self.n_nodes if n is None else n
        active = self.active if active is None else active
        return {
            "nodes": [self.node_info(k) for k in range(n)],
            "leaves": forest_rules.leaves(self.parents[:n]),
            "active_leaf": active if active >= 0 else None,
        }

    def node_logprobs(self, k: int) -> array:
        return self.logprobs[self.lp_starts[k] : self.lp_starts[k + 1]]

    # -- writing ----------------------------------------------------------------------

    def prepare(
        self,
        parent: int,
        seen: int,
        matched: int,
        message_bytes: list[bytes],
        assistant: bytes,
        rest: bytes,
        flags: int,
        prompt: array,
        completion: array,
        logprobs: array,
        answer: bytes,
        cut: int,
        timestamps: tuple[float, float],
        finish_reason: str | None,
        response_id: str | None,
        weight_version: Any,
        cached_tokens: Any,
        digest: bytes,
        message_digests: list[bytes],
        base: array | None = None,
    ) -> NodeWrite:
        """A node under ``parent`` (-1: a root) whose path holds the request's first
        ``matched`` messages. ``message_digests``: of the request's messages and
        its own (``forest_rules``); ``base``: the parent's path tokens, when the
        caller has them. Pure."""
        checkpoint = prompt + completion
        if parent >= 0:
            stored = self.path_messages(parent)
            overrides = tuple(
                (i, message_bytes[i]) for i in range(matched) if message_bytes[i] != stored[i]
            )
            common = _common_prefix(self.path_tokens(parent) if base is None else base, checkpoint)
            delta = (*message_bytes[matched:], assistant)
            delta_digests = tuple(message_digests[matched:])
        else:
            overrides, common, delta = (), 0, (*message_bytes, assistant)
            delta_digests = tuple(message_digests)
        return NodeWrite(
            parent=parent,
            seen=seen,
            messages=delta,
            overrides=overrides,
            common=common,
            suffix=checkpoint[common:],
            prompt_len=len(prompt),
            end=len(checkpoint),
            rest=rest,
            flags=flags,
            answer=answer,
            cut=cut,
            logprobs=logprobs,
            timestamps=timestamps,
            finish_reason=finish_reason,
            response_id=response_id,
            weight_version=weight_version,
            cached_tokens=cached_tokens,
            digest=digest,
            message_digests=delta_digests,
        )

    def apply(self, w: NodeWrite, keep_answer: bool = True) -> int:
        """Add a prepared node (live, or replayed from the journal); its id.

        ``keep_answer``: keep the answer (compressed) and the logprobs in
        memory; the journal keeps them on disk instead.
        """
        k = len(self.parents)
        parent = w.parent
        self.parents.append(parent)
        self.seen.append(w.seen)
        self.commons.append(w.common)
        self.prompt_lens.append(w.prompt_len)
        self.ends.append(w.end)
        self.tokens += w.suffix
        self.tok_starts.append(len(self.tokens))
        # Copies of exact size: orjson's output keeps its whole write buffer.
        stored = [bytes(memoryview(m)) for m in w.messages]
        self.messages += stored
        self.msg_starts.append(len(self.messages))
        memo = self.memo
        for text, digest in zip(stored, w.message_digests, strict=False):
            memo.setdefault(text, digest)
        if keep_answer:
            self.logprobs += w.logprobs
            answer = bytes(memoryview(_compressor.compress(w.answer)))
        else:
            answer = None
        self.lp_starts.append(len(self.logprobs))
        self.answers.append(answer)
        self.cuts.append(w.cut)
        self.flags.append(w.flags)
        rest = w.rest
        rests = self.rests
        if parent >= 0 and rests[parent] == rest:
            rest = rests[parent]  # tools and sampling fields rarely change: share them
        elif rests and rests[-1] == rest:
            rest = rests[-1]
        rests.append(rest)
        if w.overrides:
            self.overrides[k] = w.overrides
        finish = w.finish_reason
        self.finish.append(sys.intern(finish) if type(finish) is str else finish)
        self.response_ids.append(w.response_id)
        self.weight_versions.append(w.weight_version)
        self.cached.append(w.cached_tokens)
        self.times.extend(w.timestamps)
        self.digests.append(w.digest)
        self.index[w.digest] = k
        self.active = k
        return k

    def reindex(self, matcher: str) -> None:
        """Every node's path digest again, under ``matcher`` (a restart with
        another ``MESSAGE_MATCHER`` than the journal's)."""
        self.index.clear()
        self.memo.clear()
        digests, memo = self.digests, self.memo
        for k in range(self.n_nodes):
            parent = self.parents[k]
            digest = digests[parent] if parent >= 0 else forest_rules.ROOT_DIGEST
            for text in self.delta(k):
                one = memo.get(text)
                if one is None:
                    one = memo[text] = forest_rules.message_digest(orjson.loads(text), matcher)
                digest = forest_rules.chain(digest, one)
            digests[k] = digest
            self.index[digest] = k

    # -- training export ---------------------------------------------------------------

    def path_arrays(
        self, nodes: list[int], logprobs: list[array] | None
    ) -> tuple[array, list[tuple[int, int, int]]]:
        """A path's tokens and its turns as ``(node, start, stop)``: each node's
        completion span still in the path tokens (a boundary rule of a later
        node may have dropped a completion's last token)."""
        out = array(TOKEN_TYPECODE)
        spans: list[tuple[int, int, int]] = []
        tokens, starts, commons = self.tokens, self.tok_starts, self.commons
        for node in nodes:
            common = commons[node]
            if len(out) > common:
                del out[common:]
                spans = [(n, a, min(b, common)) for n, a, b in spans]
            out += tokens[starts[node] : starts[node + 1]]
            spans.append((node, self.prompt_lens[node], self.ends[node]))
        return out, spans

    def logprobs_of(self, node: int, logprobs: list[array] | None) -> array:
        if logprobs is not None:
            return logprobs[node]
        return self.node_logprobs(node)
