"""The echo backend's toy chat template: deterministic token ids without a model.

- a message is ``[ROLE(role)] + body(message) + [EOT]``, where ``body`` is
  the UTF-8 bytes of its reasoning, content and tool calls (ids 0-255);
- a prompt is its messages in order plus ``[ROLE(assistant)]`` (the
  generation prompt);
- a completion is ``body(reply) + [EOT]``.

So the prompt of turn k+1 extends turn k's prompt plus completion ids, as a
real backend reusing its KV prefix does, as long as the client sends the
assistant message back unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

# Token ids above the byte range: the template's special tokens.
EOT = 300
TOOL_CALL = 301
THINK = 302
ROLE_IDS = {"system": 256, "user": 257, "assistant": 258, "tool": 259, "developer": 260}
ROLE_OTHER = 261
ASSISTANT = ROLE_IDS["assistant"]


def _text_tokens(value: Any) -> bytes:
    if not value:
        return b""
    if isinstance(value, str):
        return value.encode()
    # Structured content (a list of parts): its canonical JSON.
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def body_tokens(message: dict[str, Any]) -> list[int]:
    """The ids of a message's body: what the template renders between role and EOT."""
    out: list[int] = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        out.append(THINK)
        out += _text_tokens(reasoning)
    out += _text_tokens(message.get("content"))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        out.append(TOOL_CALL)
        out += _text_tokens(function.get("name") or "")
        out.append(32)
        out += _text_tokens(function.get("arguments") or "")
    return out


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt ids of a chat request (generation prompt included)."""
    out: list[int] = []
    for message in messages:
        out.append(ROLE_IDS.get(message.get("role"), ROLE_OTHER))
        out += body_tokens(message)
        out.append(EOT)
    out.append(ASSISTANT)
    return out


def completion_tokens(message: dict[str, Any]) -> list[int]:
    """The ids the echo 'generates' for an assistant message."""
    return [*body_tokens(message), EOT]
