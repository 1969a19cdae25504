"""The echo backend with a real tokenizer: token ids as a model of that family makes them.

- the prompt of a request is its ``input_ids`` when it sends them, else the
  chat template over its messages (and tools) with the generation prompt,
  tokenized, as an inference server does;
- the completion is what the template renders for the echo's reply (reply
  text, tool calls), ending with the family's stop token (``Tito.completion_text``):
  ``<|im_end|>`` for ``qwen3`` (the newline the template writes after it is
  not generated; ``"echo": {"trailing": true}`` generates it too),
  ``<|observation|>`` after a tool call and ``<|user|>`` otherwise for
  ``glm47``, the template's own turn closer for ``default``;
- on command (``"echo": {"drift": true}``) the completion is tokenized
  non-canonically: each character on its own, the same text with other
  ids, as models often sample.
"""

from __future__ import annotations

import re
from typing import Any

from rollout_sessions.tito import Tito


class TokenizedTemplate:
    """Prompt and completion ids from a ``Tito`` (tokenizer, template, boundary rule)."""

    def __init__(self, tito: Tito) -> None:
        self.tito = tito
        tokenizer = tito.tokenizer
        specials = sorted(tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder))
        specials.sort(key=len, reverse=True)
        self._special = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def prompt_ids(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> list[int]:
        return self.tito.first_turn(messages, tools).tolist()

    def completion_ids(
        self,
        messages: list[dict[str, Any]],
        reply: dict[str, Any],
        tools: list[Any] | None,
        drift: bool = False,
        trailing: bool = False,
    ) -> list[int]:
        text = self.completion_text(messages, reply, tools, trailing)
        if not drift:
            return self.tito.encode(text).tolist()
        ids: list[int] = []
        for piece in self._special.split(text):
            if self._special.fullmatch(piece):
                ids += self.tito.encode(piece).tolist()
            else:
                for char in piece:
                    ids += self.tito.encode(char).tolist()
        return ids

    def completion_text(
        self,
        messages: list[dict[str, Any]],
        reply: dict[str, Any],
        tools: list[Any] | None,
        trailing: bool = False,
    ) -> str:
        """What the model generates: the template's rendering of ``reply`` after
        the generation prompt, up to and including the stop token (``trailing``:
        and the text the template writes after it)."""
        return self.tito.completion_text(messages, reply, tools, trailing=trailing)
