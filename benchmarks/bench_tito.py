"""Token-in, token-out: the cost of building a turn's ``input_ids``, by history length.

In process, with a real byte-level BPE tokenizer built offline (4000 merges,
Qwen3-style template, ``rollout_sessions.testing.tokenizers``): the time of
``Tito.next_turn`` (the template rendered over a dummy prefix and the
appended messages, the boundary rule, the appended text encoded, the
checkpoint copied) for one 400-word tool result appended to a checkpoint of
1k, 8k and 32k tokens (the tool result in common English words); and
``Tito.first_turn`` for a first prompt of the same shape. The server's
whole CPU per turn with TITO on and off is ``bench_realistic.py --tokenizer``.

Also the encode alone of the realistic workload's tool result (the 400 words
``t0 t1 ...`` that ``loadgen.py realistic`` sends), with the Qwen3-style
tokenizer (digits one by one) and the GLM-4.7-style one (digits in threes):
the floor of what TITO adds to a realistic turn.

    .venv/bin/python benchmarks/bench_tito.py

Target: 32k-token histories within 1.3x of 1k-token ones.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import RESULTS, finish  # noqa: E402
from loadgen import tool_result  # noqa: E402

from rollout_sessions.testing.tokenizers import build_tokenizer  # noqa: E402
from rollout_sessions.tito import Tito  # noqa: E402

# Tool results are mostly plain words: this gives ~1.3 tokens a word, as real
# tokenizers do on English (made-up words would cost 3-4 tokens each here).
ENGLISH = (
    "the of and to in is that for it as with was on be by this are from at or an "
    "file line error value result function return data tool search found items "
    "list name path test output input time number first new used each which"
).split()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after 5 unmeasured)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def workload_encode(merges: int, words: int, repeats: int) -> dict[str, tuple[int, float]]:
    """Tokens and median ms of ``Tito.encode`` of the realistic workload's tool
    result (the words ``loadgen.py realistic`` sends), per tokenizer family."""
    text = tool_result(words)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen3", "glm47"):
            tito = Tito.load(
                str(build_tokenizer(Path(tmp) / family, family, "append_only", merges)), family
            )
            out[family] = (
                len(tito.encode(text)),
                timed(lambda t=tito: t.encode(text), repeats) * 1000,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--merges", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--tool-words", type=int, default=400)
    p.add_argument("--json", type=Path, default=RESULTS / "tito.json")
    a = p.parse_args()
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tokenizer(Path(tmp) / "tok", "qwen3", "append_only", a.merges)
        tito = Tito.load(str(path), "qwen3")
        words = [rnd.choice(ENGLISH) for _ in range(a.tool_words)]
        tool = {"role": "tool", "content": " ".join(words)}
        appended_tokens = len(tito.encode(tool["content"]))
        last = {"role": "assistant", "content": "done"}
        end = tito._special.get("<|im_end|>", 0)  # a checkpoint ends where a turn ends
        rows = {}
        for history in (1000, 8000, 32000):
            checkpoint = array("i", [rnd.randrange(256, 4000) for _ in range(history - 1)] + [end])
            seconds = timed(lambda cp=checkpoint: tito.next_turn(cp, last, [tool], None), a.repeats)
            rows[str(history)] = seconds * 1000
            print(
                f"next_turn, {history:6} tokens of history + a {appended_tokens}-token tool "
                f"result: {seconds * 1000:.3f} ms"
            )
        first = [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": tool["content"]},
        ]
        first_ms = timed(lambda: tito.first_turn(first, None), a.repeats) * 1000
        render_ms = timed(lambda: tito.render(first, None, True, {}), a.repeats) * 1000
        encode_ms = timed(lambda: tito.encode(tool["content"]), a.repeats) * 1000
    print(
        f"first_turn ({appended_tokens}-token prompt): {first_ms:.3f} ms "
        f"(render {render_ms:.3f} ms, encode {encode_ms:.3f} ms)"
    )
    workload = workload_encode(a.merges, a.tool_words, a.repeats)
    for family, (tokens, ms) in workload.items():
        print(
            f"encode of the realistic tool result, {family} tokenizer: {tokens} tokens, {ms:.3f} ms"
        )
    ratio = rows["32000"] / rows["1000"]
    res = {
        "params": {k: str(v) for k, v in vars(a).items()},
        "appended_tokens": appended_tokens,
        "next_turn_ms": rows,
        "first_turn_ms": first_ms,
        "render_ms": render_ms,
        "encode_ms": encode_ms,
        "workload_encode": {f: {"tokens": t, "ms": ms} for f, (t, ms) in workload.items()},
    }
    targets = [
        {"target": "32k-token history within 1.3x of 1k", "value": ratio, "met": ratio <= 1.3}
    ]
    finish(res, targets, a.json)


if __name__ == "__main__":
    main()
