"""The realistic-payload backend: SGLang-shaped answers of production size.

Every chat answer carries what a real SGLang answer with ``logprobs``,
``return_prompt_token_ids`` and ``return_meta_info`` carries, at the sizes
of an agentic rollout:

- a completion of ``--completion-words`` words (default 800) and its token
  ids (one per word, plus the end-of-turn token);
- OpenAI-style ``choices[0].logprobs.content``: one object per token
  (``token``, ``logprob``, ``bytes``, ``top_logprobs``);
- ``meta_info.output_token_logprobs``: ``[logprob, token_id, None]`` per token;
- ``prompt_token_ids``: the whole prompt, from a word tokenizer under a chat
  template (``<im_start> role words <im_end>`` per message, then the
  generation prompt), so each turn's prompt extends the previous turn's
  prompt and completion; ``input_ids`` is honoured when sent.

A request with ``tools`` is answered as an agent's step: the text and one
tool call, in SGLang's message shape (``reasoning_content: null``, the call's
``index``, ``arguments`` written with spaces as models write them), and the
answer depends only on the request (not on how many came before), so the
same conversation sent twice, or in two protocols, gets the same answers.

    python benchmarks/realistic_backend.py --port 8200 [--completion-words 800]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from typing import Any

import orjson
import uvloop
from aiohttp import web

IM_START, IM_END = 1, 2
ROLE_IDS = {"system": 10, "user": 11, "assistant": 12, "tool": 13}
ROLE_OTHER = 14


def word_ids(text: str | None) -> list[int]:
    """One id per whitespace-separated word (a stable hash of the word)."""
    return [1000 + zlib.crc32(word.encode()) % 50_000 for word in (text or "").split()]


def render(messages: list[dict[str, Any]]) -> list[int]:
    out: list[int] = []
    for message in messages:
        out += [IM_START, ROLE_IDS.get(message.get("role"), ROLE_OTHER)]
        out += word_ids(message.get("content"))
        for call in message.get("tool_calls") or ():
            function = call["function"]
            out += word_ids(function["name"] + " " + function["arguments"])
        out.append(IM_END)
    return out


class Backend:
    def __init__(self, completion_words: int) -> None:
        self.completion_words = completion_words
        self.count = 0

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.count += 1
        n = self.count
        messages = body.get("messages") or []
        tools = body.get("tools")
        if tools:  # deterministic: the same request, the same answer
            last = messages[-1].get("content") if messages else ""
            n = zlib.crc32(f"{len(messages)}:{last}".encode()) % 100_003
        if "input_ids" in body:
            prompt = list(body["input_ids"])
        else:
            prompt = render(messages) + [IM_START, ROLE_IDS["assistant"]]
        text = " ".join(f"w{(n * 7 + i) % 997}" for i in range(self.completion_words))
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = "stop"
        completion = word_ids(text)
        if tools:
            name = tools[0]["function"]["name"]
            arguments = json.dumps({"query": f"q{n}", "page": n % 7})
            message["reasoning_content"] = None
            message["tool_calls"] = [
                {
                    "id": f"call_{n}",
                    "index": 0,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
            finish = "tool_calls"
            completion += word_ids(name + " " + arguments)
        completion = [*completion, IM_END]
        content = [
            {"token": f"w{i}", "logprob": -0.25, "bytes": [119, 49], "top_logprobs": []}
            for i in range(len(completion))
        ]
        answer = {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "realistic",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": {"content": content},
                    "finish_reason": finish,
                    "prompt_token_ids": prompt,
                    "meta_info": {
                        "id": str(n),
                        "prompt_tokens": len(prompt),
                        "completion_tokens": len(completion),
                        "cached_tokens": 0,
                        "finish_reason": {"type": finish},
                        "output_token_logprobs": [[-0.25, t, None] for t in completion],
                    },
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(completion),
                "total_tokens": len(prompt) + len(completion),
            },
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--completion-words", type=int, default=800)
    args = parser.parse_args()
    backend = Backend(args.completion_words)
    app = web.Application(client_max_size=1 << 28)
    app.router.add_post("/v1/chat/completions", backend.chat)
    # The same answers on a route that a session server forwards as-is
    # (loadgen.py realistic --forwarded): what its HTTP stack costs alone.
    app.router.add_post("/v1/forwarded/chat/completions", backend.chat)
    app.router.add_get("/health", backend.health)
    uvloop.install()
    # A listen queue like an inference server's (uvicorn: 2048), not aiohttp's
    # 128: a server opening a few hundred pooled connections at once (256
    # clients after 64) overflowed it, and the dropped SYNs, retried after 1
    # and 3 s, showed as multi-second p99s of every server measured.
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
