"""Tree mode's store, in process: the attach search, the samples export, a restart.

- attach: a 1,000-node session whose paths hold 200 messages (a 100-turn
  trunk of realistic messages, 900 retries branching off it); CPU per turn
  of the attach search (a request's prefix digests, then the index lookups).
  Target: at most 1 ms.
- export: a 64-leaf tree whose paths hold 32k tokens (a 16k-token trunk of 8
  nodes, 64 branches of 8 nodes of 2k tokens); the samples export (picker
  ``all``: every leaf, train-once masks) built and written as safetensors.
  Target: at most 50 ms.
- restart: a journal of 1,000 tree sessions of 32 nodes (a retry every 4th
  node) against the linear equivalent (1,000 sessions of 32 turns), each
  read back and replayed as ``serve`` does at start-up (``open_registry``).
  Target: tree at most 2x linear.

    .venv/bin/python benchmarks/bench_forest_store.py [--sessions 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import RESULTS, finish, median  # noqa: E402

from rollout_sessions.config import Settings  # noqa: E402
from rollout_sessions.journal.writer import Journal  # noqa: E402
from rollout_sessions.restart import open_registry  # noqa: E402
from rollout_sessions.trajectory import forest_rules as rules  # noqa: E402
from rollout_sessions.trajectory.forest import WITH_INPUT_IDS, Forest  # noqa: E402
from rollout_sessions.trajectory.samples import (  # noqa: E402
    SamplesRequest,
    safetensors_bytes,
    tree_samples,
)
from rollout_sessions.trajectory.store import Trajectory  # noqa: E402

TOOL = " ".join(f"t{i % 991}" for i in range(400))
TEXT = " ".join(f"w{(7 + i) % 997}" for i in range(800))
SYS = {"role": "system", "content": "You are an agent."}
USER = {"role": "user", "content": "solve " + TOOL}


def reply(k: int) -> dict[str, Any]:
    return {"role": "assistant", "content": f"{k} {TEXT}"}


def tool(k: int, variant: int = 0) -> dict[str, Any]:
    return {"role": "tool", "content": f"{k}.{variant} {TOOL}"}


ANSWER = orjson.dumps({"id": "x", "choices": [{"prompt_token_ids": []}]})
CUT = ANSWER.index(b"[]")
ANSWER = ANSWER[:CUT] + ANSWER[CUT + 2 :]


def commit(
    forest: Forest,
    messages: list[dict[str, Any]],
    answer: dict[str, Any],
    prompt: array,
    completion: array,
    answer_bytes: bytes = ANSWER,
    cut: int = CUT,
) -> tuple[int, Any]:
    """A turn as the chat turn records it (attach, prepare, apply)."""
    message_bytes = [orjson.dumps(m) for m in messages]
    paths, ones = rules.prefix_digests(messages, message_bytes, "strict", forest.memo)
    parent, matched = rules.attach(forest.index, paths)
    own = rules.message_digest(answer, "strict")
    write = forest.prepare(
        parent=parent,
        seen=forest.n_nodes,
        matched=matched,
        message_bytes=message_bytes,
        assistant=orjson.dumps(answer),
        rest=b'"model":"m","logprobs":true',
        flags=WITH_INPUT_IDS,
        prompt=prompt,
        completion=completion,
        logprobs=array("f", [-0.25] * len(completion)),
        answer=answer_bytes,
        cut=cut,
        timestamps=(time.time(), time.time()),
        finish_reason="stop",
        response_id="chatcmpl-x",
        weight_version=None,
        cached_tokens=0,
        digest=rules.chain(paths[-1], own),
        message_digests=[*ones, own],
    )
    return forest.apply(write), write


def tokens(start: int, n: int) -> array:
    return array("i", range(start, start + n))


# -- attach ------------------------------------------------------------------------


def bench_attach(repeats: int) -> dict[str, Any]:
    forest = Forest()
    messages = [SYS, USER]
    length = 0
    for k in range(100):  # the trunk: paths of up to 201 messages
        prompt = tokens(0, length + 50)
        commit(forest, messages, reply(k), prompt, tokens(length + 50, 20))
        length += 70
        messages = [*messages, reply(k), tool(k)]
    trunk = list(messages)
    k = 0
    while forest.n_nodes < 1000:  # retries off the trunk, at every depth
        depth = 1 + k % 99
        at = 2 + 2 * depth
        retry = [*trunk[: at + 1], tool(depth, 1 + k)]
        commit(forest, retry, reply(1000 + k), tokens(0, 10), tokens(10, 5))
        k += 1
    request = [*trunk]  # the next turn of the trunk: 202 messages
    request_bytes = [orjson.dumps(m) for m in request]
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(20):
            paths, _ = rules.prefix_digests(request, request_bytes, "strict", forest.memo)
            found = rules.attach(forest.index, paths)
        samples.append((time.process_time() - t0) / 20 * 1000)
    assert found == (99, 201), found
    cold = time.process_time()
    rules.prefix_digests(request, request_bytes, "strict")  # no memo: every message hashed
    cold_ms = (time.process_time() - cold) * 1000
    out = {
        "nodes": forest.n_nodes,
        "path_messages": len(request) - 1,
        "request_bytes": sum(map(len, request_bytes)),
        "cpu_ms_per_turn": median(samples),
        "cpu_ms_per_turn_without_memo": cold_ms,
    }
    print(
        f"attach: {out['nodes']} nodes, paths of {out['path_messages']} messages: "
        f"{out['cpu_ms_per_turn']:.3f} ms CPU per turn (without the memo {cold_ms:.3f} ms)"
    )
    return out


# -- export ------------------------------------------------------------------------


def bench_export(repeats: int) -> dict[str, Any]:
    forest = Forest()
    per_node = 2048
    messages: list[dict[str, Any]] = [SYS, USER]
    length = 0
    for k in range(8):  # the trunk: 16k tokens
        commit(forest, messages, reply(k), tokens(0, length + per_node - 512), tokens(0, 512))
        length += per_node
        messages = [*messages, reply(k), tool(k)]
    trunk, trunk_len = messages, length
    for b in range(64):  # 64 branches of 8 nodes: paths of 32k tokens
        messages, length = [*trunk[:-1], tool(7, b + 1)], trunk_len
        for k in range(8):
            commit(
                forest, messages, reply(100 * b + k), tokens(0, length + per_node - 512),
                tokens(0, 512),
            )  # fmt: skip
            length += per_node
            messages = [*messages, reply(100 * b + k), tool(100 * b + k)]
    samples, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        arrays, meta = tree_samples("s", forest, forest.n_nodes, forest.active, "all", REQ)
        text = {k: orjson.dumps(v).decode() if type(v) is not str else v for k, v in meta.items()}
        body = safetensors_bytes(arrays, text)
        samples.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    leaves = len(meta["samples"])
    out = {
        "nodes": forest.n_nodes,
        "leaves": leaves,
        "path_tokens": meta["samples"][0]["length"],
        "tokens_total": int(arrays["offsets"][-1]),
        "bytes": len(body),
        "ms": median(samples),
        "ms_min": min(samples),
        "cpu_ms": median(cpu),
    }
    assert leaves == 64 and out["path_tokens"] == 32 * 1024, out
    print(
        f"export: {leaves} leaves, paths of {out['path_tokens']} tokens "
        f"({out['tokens_total']} in all, {len(body) / 2**20:.1f} MiB): {out['ms']:.1f} ms "
        f"(min {out['ms_min']:.1f} ms, CPU {out['cpu_ms']:.1f} ms)"
    )
    return out


REQ = SamplesRequest(reward=1.0, metadata={"task": "bench"})


# -- restart -------------------------------------------------------------------------


def write_journal(directory: Path, mode: str, sessions: int, turns: int) -> int:
    """A journal of ``sessions`` sessions of ``turns`` turns (or nodes)."""

    async def run() -> int:
        journal = Journal(directory)
        journal.load(1024, 0, lambda done, total: None)
        journal.save_start(b"\0" * 56, 0, 0)
        journal.start(asyncio.get_running_loop())
        answer = orjson.dumps({"id": "x", "choices": [{"prompt_token_ids": [], "x": TEXT}]})
        cut = answer.index(b"[]")
        answer = answer[:cut] + answer[cut + 2 :]
        written = 0
        for s in range(sessions):
            key = s.to_bytes(16, "little")
            sid = f"bench-{s}"
            pending = []
            if mode == "linear":
                traj = Trajectory()
                messages: list[dict[str, Any]] = [SYS, USER]
                for k in range(turns):
                    prompt = tokens(0, 200 * k + 100)
                    write = traj.prepare(
                        keep=traj.num_turns, exact=len(traj.messages),
                        message_bytes=[orjson.dumps(m) for m in messages],
                        assistant=orjson.dumps(reply(k)), rest=b'"model":"m"',
                        with_input_ids=False, prompt=prompt, completion=tokens(0, 100),
                        logprobs=array("f", [0.0] * 100), answer=answer, cut=cut,
                        timestamps=(1.0, 1.0),
                    )  # fmt: skip
                    traj.apply(write, keep_answer=False)
                    pending.append(journal.turn(key, sid, "auto", write, has_row=k > 0))
                    messages = [*messages, reply(k), tool(k)]
            else:
                forest = Forest()
                messages = [SYS, USER]
                length = 0
                for k in range(turns):
                    retry = k % 4 == 3 and k > 0
                    msgs = [*messages[:-1], tool(k, 9)] if retry else messages
                    prompt = tokens(0, length + 100)
                    _, write = commit(forest, msgs, reply(k), prompt, tokens(0, 100), answer, cut)
                    pending.append(journal.nodes(key, sid, "auto", [write], "strict", k > 0, k))
                    if not retry:
                        length += 200
                        messages = [*messages, reply(k), tool(k)]
            await asyncio.gather(*pending)
            written += len(pending)
        await journal.close()
        return written

    return asyncio.run(run())


def time_restart(directory: Path, mode: str) -> float:
    settings = Settings(data_dir=str(directory), trajectory=mode, log_level="warning")
    t0 = time.perf_counter()
    registry, journal = open_registry(settings)
    elapsed = time.perf_counter() - t0
    assert journal is not None
    journal._checkpointer.stop()  # never started; closes nothing
    journal._conn.close()
    journal._lock.close()
    del registry
    return elapsed


def bench_restart(sessions: int, turns: int, repeats: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-forest-"))
    try:
        out: dict[str, Any] = {"sessions": sessions, "turns_or_nodes": turns}
        for mode in ("linear", "tree"):
            d = root / mode
            t0 = time.perf_counter()
            written = write_journal(d, mode, sessions, turns)
            out[f"{mode}_written"] = written
            print(f"restart: wrote {written} {mode} rows in {time.perf_counter() - t0:.1f}s")
        times: dict[str, list[float]] = {"linear": [], "tree": []}
        for r in range(repeats):
            for mode in ("linear", "tree") if r % 2 == 0 else ("tree", "linear"):
                times[mode].append(time_restart(root / mode, mode))
        for mode in times:
            out[f"{mode}_s"] = median(times[mode])
        out["ratio"] = out["tree_s"] / out["linear_s"]
        print(
            f"restart: linear {out['linear_s']:.2f}s, tree {out['tree_s']:.2f}s "
            f"({out['ratio']:.2f}x)"
        )
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=RESULTS / "forest_store.json")
    a = p.parse_args()
    res: dict[str, Any] = {"args": {k: v for k, v in vars(a).items() if k != "json"}}
    res["attach"] = bench_attach(a.repeats)
    res["export"] = bench_export(a.repeats)
    res["restart"] = bench_restart(a.sessions, a.nodes, 3)
    targets = [
        {
            "target": "attach search at 1,000 nodes, 200-message paths: <= 1 ms CPU per turn",
            "value": res["attach"]["cpu_ms_per_turn"],
            "met": res["attach"]["cpu_ms_per_turn"] <= 1.0,
        },
        {
            "target": "samples export, 64 leaves of 32k tokens: <= 50 ms",
            "value": res["export"]["ms"],
            "met": res["export"]["ms"] <= 50.0,
        },
        {
            "target": "restart of 1,000 tree sessions of 32 nodes: <= 2x linear",
            "value": res["restart"]["ratio"],
            "met": res["restart"]["ratio"] <= 2.0,
        },
    ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
