"""The rules of a trajectory forest (``TRAJECTORY=tree``), as pure functions.

Message matching (``MESSAGE_MATCHER``). Two messages match when their *keys*
are equal; a key is what a chat template renders of the message, as canonical
JSON:

- ``strict``: role, content, reasoning_content and tool_calls (without the
  wire-only ``index``), with ``None``, ``""`` and ``[]`` alike (the linear rule);
- ``loose_tool_call``: as ``strict``, and a tool call's ``arguments`` compared
  as parsed JSON (``{"a": 1}`` and ``{ "a":1 }`` match);
- ``role_content_only``: role and content.

Attach search without comparing nodes' messages one by one: a message has a
digest (of its key), a path of messages a digest chained message by message
(``chain``), so a request's prefixes have digests ``D[0..L]`` computed once
(a message the forest stores byte for byte is looked up, not hashed again:
``prefix_digests``' memo), and each node keeps its path's digest in an index
(digest -> latest node). The deepest
node whose path is a prefix of the request is then the largest ``i`` with
``D[i]`` in the index: ``L`` dictionary lookups, whatever the forest's size.

Pickers (``SAMPLE_PICKER``) choose the leaves the samples export keeps:
``drop_retries`` drops a leaf when its parent got a child whose request
arrived after the leaf was committed (a retry superseded it); siblings that
overlapped in time, and the n choices of one request, are all kept. ``all``
keeps every leaf; ``active`` the active path only. ``train_once`` decides,
for completions shared by several kept samples, which sample trains them:
the one of the lowest leaf id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Any

import orjson

MATCHERS = ("strict", "loose_tool_call", "role_content_only")
PICKERS = ("drop_retries", "all", "active")
DIGEST_SIZE = 16
ROOT_DIGEST = b""  # the digest of no messages

_SORTED = orjson.OPT_SORT_KEYS


def _norm(value: Any) -> Any:
    if value is None or value == "" or value == []:
        return None
    return value


def _tool_calls(value: Any, parse_arguments: bool) -> Any:
    value = _norm(value)
    if type(value) is not list:
        return value
    out = []
    for call in value:
        if type(call) is not dict:
            out.append(call)
            continue
        call = {k: v for k, v in call.items() if k != "index"}
        function = call.get("function")
        if parse_arguments and type(function) is dict:
            arguments = function.get("arguments")
            if type(arguments) is str:
                try:
                    call["function"] = {**function, "arguments": orjson.loads(arguments)}
                except orjson.JSONDecodeError:
                    pass  # not JSON: compared as text
        out.append(call)
    return out


def _strict_key(message: dict[str, Any]) -> list[Any]:
    return [
        message.get("role"),
        _norm(message.get("content")),
        _norm(message.get("reasoning_content")),
        _tool_calls(message.get("tool_calls"), False),
    ]


def _loose_key(message: dict[str, Any]) -> list[Any]:
    return [
        message.get("role"),
        _norm(message.get("content")),
        _norm(message.get("reasoning_content")),
        _tool_calls(message.get("tool_calls"), True),
    ]


def _role_content_key(message: dict[str, Any]) -> list[Any]:
    return [message.get("role"), _norm(message.get("content"))]


_KEYS: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
    "strict": _strict_key,
    "loose_tool_call": _loose_key,
    "role_content_only": _role_content_key,
}


def message_key(message: dict[str, Any], matcher: str) -> bytes:
    """What ``matcher`` compares of a message, as canonical JSON bytes."""
    try:
        return orjson.dumps(_KEYS[matcher](message), option=_SORTED)
    except orjson.JSONEncodeError:  # e.g. an integer past 64 bits: compared as written
        return orjson.dumps(repr(_KEYS[matcher](message)))


def messages_match(a: dict[str, Any], b: dict[str, Any], matcher: str) -> bool:
    return message_key(a, matcher) == message_key(b, matcher)


# hashlib lets go of the GIL for an input of 2048 bytes or more; on the event
# loop, taking it back waits for the journal's writer thread (up to the switch
# interval). Fed in smaller pieces, a message's hash keeps the GIL.
_PIECE = 2000


def message_digest(message: dict[str, Any], matcher: str) -> bytes:
    """The digest of one message's key."""
    key = message_key(message, matcher)
    if len(key) <= _PIECE:
        return blake2b(key, digest_size=DIGEST_SIZE).digest()
    h = blake2b(digest_size=DIGEST_SIZE)
    view = memoryview(key)
    for at in range(0, len(key), _PIECE):
        h.update(view[at : at + _PIECE])
    return h.digest()


def chain(previous: bytes, digest: bytes) -> bytes:
    """The digest of a path: the digest of the path before it, then one message's."""
    return blake2b(previous + digest, digest_size=DIGEST_SIZE).digest()


def prefix_digests(
    messages: Sequence[dict[str, Any]],
    message_bytes: Sequence[bytes],
    matcher: str,
    memo: dict[bytes, bytes] | None = None,
    hint: Sequence[bytes] = (),
) -> tuple[list[bytes], list[bytes]]:
    """``(D, M)``: ``D[i]`` the digest of ``messages[:i]`` (``i`` in ``0..L``), ``M[i]``
    the digest of ``messages[i]``.

    ``memo`` maps a stored message's bytes to its digest: a message sent again
    byte for byte (nearly all of a request) costs a lookup, not a key and a
    hash over its content. ``hint``: stored messages (the active path's) the
    request likely repeats: while it does, each is looked up by the stored
    object (whose hash Python keeps) after a byte comparison, so the
    request's own bytes are not even hashed.
    """
    paths = [ROOT_DIGEST]
    digests = []
    path = ROOT_DIGEST
    get = memo.get if memo is not None else None
    same = min(len(hint), len(message_bytes))
    for i, (message, text) in enumerate(zip(messages, message_bytes, strict=True)):
        digest = None
        if get is not None:
            if i < same and hint[i] == text:
                digest = get(hint[i])
            else:
                same = 0  # diverged from the hint: look the request's bytes up
                digest = get(text)
        if digest is None:
            digest = message_digest(message, matcher)
        digests.append(digest)
        path = blake2b(path + digest, digest_size=DIGEST_SIZE).digest()
        paths.append(path)
    return paths, digests


def attach(index: dict[bytes, int], digests: Sequence[bytes]) -> tuple[int, int]:
    """``(node, matched)``: the deepest node whose path is a prefix of the request
    (``digests`` from ``prefix_digests``), and how many request messages its path
    holds; ``(-1, 0)``: none, a new root. ``index`` maps a path digest to the
    latest node with that path (equal depth: the latest)."""
    for i in range(len(digests) - 1, 0, -1):
        node = index.get(digests[i])
        if node is not None:
            return node, i
    return -1, 0


# -- pickers -------------------------------------------------------------------------


def leaves(parents: Sequence[int]) -> list[int]:
    """Node ids without children, ascending."""
    has_child = bytearray(len(parents))
    for parent in parents:
        if parent >= 0:
            has_child[parent] = 1
    return [k for k in range(len(parents)) if not has_child[k]]


def superseded(parents: Sequence[int], seen: Sequence[int]) -> set[int]:
    """Leaves that a retry superseded: their parent got a child whose request
    arrived after the leaf was committed. ``seen[k]``: how many nodes the
    session had committed when node k's request arrived (node ids are commit
    order, so node L was committed before k's request arrived iff
    ``seen[k] > L``). Roots have no parent: never superseded."""
    latest_arrival: dict[int, int] = {}  # parent -> the largest `seen` among its children
    for k, parent in enumerate(parents):
        if parent >= 0 and seen[k] > latest_arrival.get(parent, -1):
            latest_arrival[parent] = seen[k]
    out = set()
    for leaf in leaves(parents):
        parent = parents[leaf]
        if parent >= 0 and latest_arrival[parent] > leaf:
            out.add(leaf)
    return out


def pick(picker: str, parents: Sequence[int], seen: Sequence[int], active: int) -> list[int]:
    """The leaves (node ids, ascending) whose samples the export keeps. ``active``
    gives the active node (-1: none), which need not be a leaf."""
    if picker == "active":
        return [active] if active >= 0 else []
    found = leaves(parents)
    if picker == "all":
        return found
    if picker != "drop_retries":
        raise ValueError(f"unknown picker {picker!r}")
    dropped = superseded(parents, seen)
    return [leaf for leaf in found if leaf not in dropped]


def path(parents: Sequence[int], node: int) -> list[int]:
    """Node ids from the root to ``node``."""
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    out.reverse()
    return out


def train_once(paths: Sequence[Sequence[int]]) -> list[list[bool]]:
    """For each sample's path (samples in ascending leaf id), whether each of its
    nodes' completions is trained in it: a completion shared by several kept
    samples is trained in the first (lowest leaf id) only."""
    trained: set[int] = set()
    out = []
    for nodes in paths:
        flags = []
        for node in nodes:
            flags.append(node not in trained)
            trained.add(node)
        out.append(flags)
    return out
