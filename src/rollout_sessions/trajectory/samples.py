"""Training samples of a session, in both trajectory modes (``POST /sessions/{id}/samples``).

One sample per kept leaf (tree mode, ``SAMPLE_PICKER`` chooses the leaves;
``forest_rules.pick``) or one sample of the trajectory (linear mode; none for
an empty session). The arrays are concatenated over the samples:

- ``tokens`` (int32), ``loss_mask`` (uint8, 1 on generated tokens),
  ``rollout_log_probs`` (float32, 0 where the mask is 0), and ``offsets``
  (int64, k+1 entries: sample i is ``[offsets[i], offsets[i+1])``);
- a completion shared by several kept samples is trained (mask 1) in the
  sample of the lowest leaf id only (``forest_rules.train_once``);
- when answers carried routing-replay payloads (``meta_info.routed_experts``
  and ``indexer_topk``, base64 of int32 or lists of ints), the last turn's
  payload of each sample comes back as ``rollout_routed_experts`` and
  ``rollout_indexer_topk`` (int32, one row per token of the sample but the
  last; zeros for a sample without one).

Each sample's metadata: ``leaf`` and ``path`` (node ids; null in linear
mode), ``turns`` (each turn's ``[completion_start, completion_end)`` within
the sample), ``length``, ``truncated`` (and ``original_length`` when
``max_seq_len`` cut it), per turn ``finish_reasons``, ``weight_versions`` and
``cached_tokens`` (null where the backend did not say), ``reward`` and the
body's ``metadata`` keys (the server's keys win).
"""

from __future__ import annotations

import base64
import binascii
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import simdjson
import zstandard

from rollout_sessions.trajectory import forest_rules
from rollout_sessions.trajectory.forest import REPLAY
from rollout_sessions.upstream.answer import REPLAY_KEYS
from rollout_sessions.web import errors
from rollout_sessions.web.endpoints import parse_json

if TYPE_CHECKING:
    from rollout_sessions.trajectory.forest import Forest
    from rollout_sessions.trajectory.store import Trajectory

_decompressor = zstandard.ZstdDecompressor()
ARRAY_NAMES = {"routed_experts": "rollout_routed_experts", "indexer_topk": "rollout_indexer_topk"}


@dataclass(frozen=True, slots=True)
class SamplesRequest:
    max_seq_len: int | None = None
    reward: float | int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_body(body: bytes) -> SamplesRequest:
    """The export's body: ``{}`` or any of ``max_seq_len``, ``reward``, ``metadata``;
    ``ApiError`` 400 naming what is wrong."""
    if not body:
        return SamplesRequest()
    data = parse_json(body)
    if type(data) is not dict:
        raise errors.bad_json("expected a JSON object")
    max_seq_len = data.get("max_seq_len")
    if max_seq_len is not None and (type(max_seq_len) is not int or max_seq_len < 1):
        raise errors.invalid_samples_request("max_seq_len must be a positive integer")
    reward = data.get("reward")
    if reward is not None and type(reward) not in (int, float):
        raise errors.invalid_samples_request("reward must be a number")
    metadata = data.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise errors.invalid_samples_request("metadata must be a JSON object")
    return SamplesRequest(max_seq_len, reward, metadata or {})


@dataclass(slots=True)
class TurnInfo:
    """What the export reads of one turn's answer."""

    finish_reason: Any = None
    weight_version: Any = None
    cached_tokens: Any = None
    replay: dict[str, Any] = field(default_factory=dict)  # REPLAY_KEYS present in meta_info
    response_id: Any = None


def turn_info(compressed: bytes, cut: int, with_replay: bool) -> TurnInfo:
    """Read a stored answer's ``choices[0]`` finish reason and ``meta_info``
    (lazily: simdjson builds only what is read). The store keeps the answer
    without its prompt ids value (which goes back at ``cut``): an empty list
    stands in for it."""
    text = _decompressor.decompress(compressed)
    doc = simdjson.Parser().parse(b"".join((text[:cut], b"[]", text[cut:])))
    info = TurnInfo()
    info.response_id = _plain(doc.get("id"))
    try:
        choice = doc["choices"][0]
    except (KeyError, IndexError, TypeError):
        return info
    info.finish_reason = _plain(choice.get("finish_reason"))
    meta = choice.get("meta_info")
    if isinstance(meta, simdjson.Object):
        info.weight_version = _plain(meta.get("weight_version"))
        info.cached_tokens = _plain(meta.get("cached_tokens"))
        if with_replay:
            for key in REPLAY_KEYS:
                if key in meta:
                    info.replay[key] = _plain(meta[key])
    return info


def _plain(value: Any) -> Any:
    if isinstance(value, (simdjson.Object, simdjson.Array)):
        return value.as_dict() if isinstance(value, simdjson.Object) else value.as_list()
    return value


def replay_rows(value: Any, rows: int, where: str) -> np.ndarray:
    """A routing-replay payload as int32 rows, one per token but the last."""
    if type(value) is str:
        try:
            flat = np.frombuffer(base64.b64decode(value, validate=True), dtype=np.int32)
        except (binascii.Error, ValueError):
            raise errors.upstream_malformed(f"{where} is not base64 of int32 values") from None
    else:
        try:
            flat = np.asarray(value, dtype=np.int32).ravel()
        except (TypeError, ValueError, OverflowError):
            raise errors.upstream_malformed(f"{where} is not a list of integers") from None
    if rows <= 0 or flat.size % rows:
        raise errors.upstream_malformed(
            f"{where} holds {flat.size} values, not a whole number of rows for {rows} tokens"
        )
    return flat.reshape(rows, flat.size // rows)


class _Builder:
    """The samples' metadata and routing-replay rows, one sample at a time."""

    def __init__(self, req: SamplesRequest) -> None:
        self.req = req
        self.replays: dict[str, list[tuple[int, np.ndarray | None]]] = {k: [] for k in REPLAY_KEYS}
        self.samples: list[dict[str, Any]] = []

    def kept_length(self, length: int) -> int:
        limit = self.req.max_seq_len
        return length if limit is None else min(length, limit)

    def add(
        self,
        length: int,
        turns: list[list[int]],
        infos: list[TurnInfo],
        leaf: int | None,
        path: list[int] | None,
    ) -> None:
        """A sample of ``length`` tokens (before ``max_seq_len``)."""
        req = self.req
        meta: dict[str, Any] = {
            "leaf": leaf,
            "path": path,
            "turns": turns,
            "length": length,
            "truncated": False,
        }
        kept = self.kept_length(length)
        if kept < length:
            meta.update(truncated=True, original_length=length, length=kept)
            meta["turns"] = [[a, min(b, kept)] for a, b in turns if a < kept]
        meta["finish_reasons"] = [i.finish_reason for i in infos]
        meta["weight_versions"] = [i.weight_version for i in infos]
        meta["cached_tokens"] = [i.cached_tokens for i in infos]
        meta["reward"] = req.reward
        self.samples.append({**req.metadata, **meta})
        last = infos[-1].replay if infos else {}
        rows = max(kept - 1, 0)
        for key in REPLAY_KEYS:
            payload = last.get(key)
            if payload is None:
                self.replays[key].append((rows, None))
            else:
                where = f"meta_info.{key} of sample {len(self.samples) - 1}"
                self.replays[key].append((rows, replay_rows(payload, length - 1, where)[:rows]))

    def replay_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for key, parts in self.replays.items():
            widths = {p.shape[1] for _, p in parts if p is not None}
            if not widths:
                continue
            if len(widths) > 1:
                raise errors.upstream_malformed(
                    f"meta_info.{key} payloads have different widths: {sorted(widths)}"
                )
            width = widths.pop()
            out[ARRAY_NAMES[key]] = np.concatenate(
                [p if p is not None else np.zeros((rows, width), np.int32) for rows, p in parts]
            )
        return out


def answers_needed(traj: Trajectory) -> list[int]:
    """The turns whose answers the linear export reads: those recorded without
    their extras (an older journal), and the last one when it has a
    routing-replay payload."""
    last = traj.num_turns - 1
    return [
        k
        for k, turn in enumerate(traj.turns)
        if turn.extras is None or (k == last and turn.extras[3])
    ]


def linear_samples(
    session_id: str,
    traj: Trajectory | None,
    req: SamplesRequest,
    logprobs: list[array] | None = None,
    answers: dict[int, bytes] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The linear trajectory's sample: its arrays and the metadata (the single
    sample's keys at the top level too, as before ``samples`` existed)."""
    builder = _Builder(req)
    if traj is not None and traj.num_turns:
        tokens, mask, values, turns = traj.sample_arrays(logprobs)
        last = traj.num_turns - 1
        infos = []
        for k, turn in enumerate(traj.turns):
            extras = turn.extras
            if extras is not None and not (k == last and extras[3]):
                infos.append(TurnInfo(*extras[:3]))
                continue
            # Not kept with the turn (an older journal), or a payload to read.
            answer = answers[k] if answers is not None else turn.answer
            infos.append(turn_info(answer, turn.cut, with_replay=k == last))  # type: ignore[arg-type]
        builder.add(len(tokens), turns, infos, None, None)
        kept = builder.kept_length(len(tokens))
        tokens, mask, values = tokens[:kept], mask[:kept], values[:kept]
    else:
        tokens = np.zeros(0, dtype=np.int32)
        mask = np.zeros(0, dtype=np.uint8)
        values = np.zeros(0, dtype=np.float32)
    offsets = np.array([0, len(tokens)] if builder.samples else [0], dtype=np.int64)
    arrays = {"tokens": tokens, "loss_mask": mask, "rollout_log_probs": values, "offsets": offsets}
    arrays.update(builder.replay_arrays())
    meta: dict[str, Any] = {"session_id": session_id}
    if builder.samples:
        only = builder.samples[0]
        for key in ("turns", "length", "truncated", "original_length"):
            if key in only:
                meta[key] = only[key]
        meta["num_assistant"] = len(meta["turns"])  # the turns the sample holds (after a cut)
    else:
        meta.update(num_assistant=0, turns=[], length=0, truncated=False)
    meta["samples"] = builder.samples
    return arrays, meta


def tree_samples(
    session_id: str,
    forest: Forest | None,
    n: int,
    active: int,
    picker: str,
    req: SamplesRequest,
    logprobs: list[array] | None = None,
    answers: dict[int, bytes] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One sample per kept leaf of the first ``n`` nodes (``logprobs``: per node,
    when the journal keeps them; ``answers``: the compressed answers of the nodes
    whose payloads are read, likewise).

    The arrays are allocated once at their total size and each sample's path
    is written into them node by node (a node's suffix at its ``common``):
    no per-sample copy, no concatenation.
    """
    builder = _Builder(req)
    kept: list[int] = []
    if forest is not None and n:
        parents = forest.parents[:n]
        kept = forest_rules.pick(picker, parents, forest.seen[:n], active)
    lengths = [builder.kept_length(forest.ends[leaf]) for leaf in kept]  # type: ignore[union-attr]
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    if kept:
        np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.empty(total, dtype=np.int32)
    mask = np.zeros(total, dtype=np.uint8)
    values = np.zeros(total, dtype=np.float32)
    if kept:
        assert forest is not None
        paths = [forest_rules.path(parents, leaf) for leaf in kept]
        source = np.frombuffer(forest.tokens, dtype=np.int32)
        lp_all = np.frombuffer(forest.logprobs, dtype=np.float32) if logprobs is None else None
        commons, ends, starts = forest.commons, forest.ends, forest.tok_starts
        prompt_lens, lp_starts = forest.prompt_lens, forest.lp_starts
        trained = forest_rules.train_once(paths)
        for i, (leaf, path) in enumerate(zip(kept, paths, strict=True)):
            base, length = int(offsets[i]), lengths[i]
            for node in path:  # later nodes overwrite from their common
                a, b = commons[node], min(ends[node], length)
                if b > a:
                    start = starts[node]
                    tokens[base + a : base + b] = source[start : start + b - a]
            # A completion is in the sample up to the lowest common of the nodes after it.
            stops = [0] * len(path)
            floor = ends[leaf]
            for j in range(len(path) - 1, -1, -1):
                node = path[j]
                stops[j] = min(ends[node], floor)
                floor = min(floor, commons[node])
            turns = []
            for j, node in enumerate(path):
                stop = stops[j]
                start = min(prompt_lens[node], stop)
                turns.append([start, stop])
                b = min(stop, length)
                if trained[i][j] and b > start:
                    mask[base + start : base + b] = 1
                    if lp_all is not None:
                        lp = lp_all[lp_starts[node] : lp_starts[node] + b - start]
                    else:
                        lp = np.frombuffer(logprobs[node], dtype=np.float32)[: b - start]  # type: ignore[index]
                    values[base + start : base + b] = lp
            infos = [_node_info(forest, node, node == leaf, answers) for node in path]
            builder.add(ends[leaf], turns, infos, leaf, path)
    arrays = {"tokens": tokens, "loss_mask": mask, "rollout_log_probs": values, "offsets": offsets}
    arrays.update(builder.replay_arrays())
    return arrays, {"session_id": session_id, "samples": builder.samples}


def _node_info(forest: Forest, node: int, last: bool, answers: dict[int, bytes] | None) -> TurnInfo:
    info = TurnInfo(forest.finish[node], forest.weight_versions[node], forest.cached[node])
    if last and forest.flags[node] & REPLAY:
        compressed = answers.get(node) if answers is not None else forest.answers[node]
        if compressed is not None:
            info.replay = turn_info(compressed, forest.cuts[node], True).replay
    return info


_DTYPES = {
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
    np.dtype(np.float32): "F32",
}


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """``arrays`` in the safetensors format, written in one join.

    The format is a little-endian u64 header length, a JSON header (each
    tensor's dtype, shape and byte range; ``__metadata__``), padded with
    spaces to 8 bytes, then the tensors' bytes back to back. Writing it here
    copies each array once; ``safetensors.numpy.save`` copied a large export
    (tens of MiB) several times over.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    parts: list[Any] = []
    at = 0
    for name, values in arrays.items():
        values = np.ascontiguousarray(values)
        size = values.nbytes
        header[name] = {
            "dtype": _DTYPES[values.dtype],
            "shape": list(values.shape),
            "data_offsets": [at, at + size],
        }
        parts.append(memoryview(values).cast("B") if size else b"")
        at += size
    text = orjson.dumps(header)
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *parts])
