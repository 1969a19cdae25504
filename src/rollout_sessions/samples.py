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
import simdjson
import zstandard

from rollout_sessions import errors, forest_rules
from rollout_sessions.answer import REPLAY_KEYS
from rollout_sessions.forest import REPLAY
from rollout_sessions.web import parse_json

if TYPE_CHECKING:
    from rollout_sessions.forest import Forest
    from rollout_sessions.store import Trajectory

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


def turn_info(compressed: bytes, cut: int, with_replay: bool) -> TurnInfo:
    """Read a stored answer's ``choices[0]`` finish reason and ``meta_info``
    (lazily: simdjson builds only what is read). The store keeps the answer
    without its prompt ids value (which goes back at ``cut``): an empty list
    stands in for it."""
    text = _decompressor.decompress(compressed)
    doc = simdjson.Parser().parse(b"".join((text[:cut], b"[]", text[cut:])))
    info = TurnInfo()
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
    """Samples appended one by one, concatenated at the end."""

    def __init__(self, req: SamplesRequest) -> None:
        self.req = req
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.replays: dict[str, list[tuple[int, np.ndarray | None]]] = {k: [] for k in REPLAY_KEYS}
        self.samples: list[dict[str, Any]] = []

    def add(
        self,
        tokens: np.ndarray,
        mask: np.ndarray,
        values: np.ndarray,
        turns: list[list[int]],
        infos: list[TurnInfo],
        leaf: int | None,
        path: list[int] | None,
    ) -> None:
        req = self.req
        length = len(tokens)
        meta: dict[str, Any] = {
            "leaf": leaf,
            "path": path,
            "turns": turns,
            "length": length,
            "truncated": False,
        }
        limit = req.max_seq_len
        if limit is not None and length > limit:
            meta.update(truncated=True, original_length=length, length=limit)
            tokens, mask, values = tokens[:limit], mask[:limit], values[:limit]
            meta["turns"] = [[a, min(b, limit)] for a, b in turns if a < limit]
        meta["finish_reasons"] = [i.finish_reason for i in infos]
        meta["weight_versions"] = [i.weight_version for i in infos]
        meta["cached_tokens"] = [i.cached_tokens for i in infos]
        meta["reward"] = req.reward
        self.samples.append({**req.metadata, **meta})
        self.tokens.append(tokens)
        self.masks.append(mask)
        self.values.append(values)
        last = infos[-1].replay if infos else {}
        rows = max(length - 1, 0)
        for key in REPLAY_KEYS:
            payload = last.get(key)
            kept = len(tokens) - 1 if len(tokens) else 0
            if payload is None:
                self.replays[key].append((kept, None))
            else:
                where = f"meta_info.{key} of sample {len(self.samples) - 1}"
                self.replays[key].append((kept, replay_rows(payload, rows, where)[:kept]))

    def arrays(self) -> dict[str, np.ndarray]:
        offsets = np.zeros(len(self.tokens) + 1, dtype=np.int64)
        if self.tokens:
            np.cumsum([len(t) for t in self.tokens], out=offsets[1:])
        out = {
            "tokens": _concat(self.tokens, np.int32),
            "loss_mask": _concat(self.masks, np.uint8),
            "rollout_log_probs": _concat(self.values, np.float32),
            "offsets": offsets,
        }
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


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def linear_samples(
    session_id: str,
    traj: Trajectory | None,
    req: SamplesRequest,
    logprobs: list[array] | None = None,
    answers: list[bytes] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The linear trajectory's sample: its arrays and the metadata (the single
    sample's keys at the top level too, as before ``samples`` existed)."""
    builder = _Builder(req)
    if traj is not None and traj.num_turns:
        tokens, mask, values, turns = traj.sample_arrays(logprobs)
        last = traj.num_turns - 1
        infos = [
            turn_info(
                answers[k] if answers is not None else traj.turns[k].answer,  # type: ignore[arg-type]
                traj.turns[k].cut,
                with_replay=k == last,
            )
            for k in range(traj.num_turns)
        ]
        builder.add(tokens, mask, values, turns, infos, None, None)
    arrays = builder.arrays()
    meta: dict[str, Any] = {"session_id": session_id}
    if builder.samples:
        only = builder.samples[0]
        meta["num_assistant"] = traj.num_turns  # type: ignore[union-attr]
        for key in ("turns", "length", "truncated", "original_length"):
            if key in only:
                meta[key] = only[key]
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
    """One sample per kept leaf of the first ``n`` nodes (``answers``: the
    compressed answers of the nodes whose info is read, when the journal keeps them)."""
    builder = _Builder(req)
    if forest is not None and n:
        parents = forest.parents[:n]
        kept = forest_rules.pick(picker, parents, forest.seen[:n], active)
        paths = [forest_rules.path(parents, leaf) for leaf in kept]
        for leaf, path, trained in zip(kept, paths, forest_rules.train_once(paths), strict=True):
            tokens_arr, spans = forest.path_arrays(path, None)
            tokens = np.frombuffer(tokens_arr, dtype=np.int32)
            mask = np.zeros(len(tokens), dtype=np.uint8)
            values = np.zeros(len(tokens), dtype=np.float32)
            turns = []
            for (node, start, stop), train in zip(spans, trained, strict=True):
                start = min(start, stop)
                turns.append([start, stop])
                if train and stop > start:
                    mask[start:stop] = 1
                    source = np.frombuffer(forest.logprobs_of(node, logprobs), dtype=np.float32)
                    values[start:stop] = source[: stop - start]
            infos = [_node_info(forest, node, node == leaf, answers) for node in path]
            builder.add(tokens, mask, values, turns, infos, leaf, path)
    arrays = builder.arrays()
    return arrays, {"session_id": session_id, "samples": builder.samples}


def _node_info(forest: Forest, node: int, last: bool, answers: dict[int, bytes] | None) -> TurnInfo:
    info = TurnInfo(forest.finish[node], forest.weight_versions[node], forest.cached[node])
    if last and forest.flags[node] & REPLAY:
        compressed = answers.get(node) if answers is not None else forest.answers[node]
        if compressed is not None:
            info.replay = turn_info(compressed, forest.cuts[node], True).replay
    return info
