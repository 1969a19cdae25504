"""Token-in, token-out: the server builds every prompt's token ids itself.

With ``TOKENIZER`` set, each chat turn is sent upstream with ``input_ids``
beside the original ``messages`` and ``tools``, and the ids the model
generated are never re-tokenized:

- first turn (or a rollback to nothing): the chat template rendered over
  the messages (and tools) with the generation prompt, tokenized;
- later turns: the stored checkpoint (prompt + completion ids of the turn it
  builds on), its end fixed by the family's boundary rule, then the ids of
  only the appended messages. Those are rendered after a dummy prefix (a
  system message and an assistant message carrying the stored assistant's
  real ``tool_calls``, which some templates need to render tool results)
  and the render without them is cut off as text; the generation prompt
  comes once, at the end.

Boundary rules (``TITO_MODEL``), for where the checkpoint meets the appended ids:

- ``default``: plain concatenation (the stop token is exactly how the
  template closes a turn);
- ``qwen3``: a final ``<|im_end|>`` is followed by the newline the template
  writes after it (the model stops at ``<|im_end|>``). Right for Qwen3,
  Qwen3.5, Qwen3-Next and Nemotron-3 (``qwen35``, ``qwennext``, ``nemotron3``
  are accepted as names of the same rule);
- ``glm47``: a final ``<|observation|>`` or ``<|user|>`` is dropped: GLM's
  stop token is also the opener the template renders for the next message.
  Right for GLM-4.5 to GLM-4.7 and GLM-5 (``glm45``, ``glm5``).

The tokenizer is loaded once with ``transformers.AutoTokenizer``;
``CHAT_TEMPLATE`` (a jinja file) replaces its template and
``CHAT_TEMPLATE_KWARGS`` (a JSON object) is passed to every render, updated
by a request's own ``chat_template_kwargs``.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout_sessions.trajectory.store import TOKEN_TYPECODE
from rollout_sessions.web import errors

log = logging.getLogger("rollout_sessions")

_DUMMY_SYSTEM = {"role": "system", "content": "dummy system"}


@dataclass(frozen=True, slots=True)
class Rule:
    """How a stored checkpoint's end meets the ids of the messages appended to it."""

    name: str
    families: str
    # Special tokens it looks at, resolved to ids when the tokenizer loads.
    tokens: tuple[str, ...]
    apply: Callable[[array, dict[str, int]], array]


def _concat(ids: array, special: dict[str, int]) -> array:
    return ids


def _qwen3(ids: array, special: dict[str, int]) -> array:
    if ids and ids[-1] == special["<|im_end|>"]:
        out = array(TOKEN_TYPECODE, ids)
        out.append(special["\n"])
        return out
    return ids


def _glm47(ids: array, special: dict[str, int]) -> array:
    if ids and ids[-1] in (special["<|observation|>"], special["<|user|>"]):
        return ids[:-1]
    return ids


_DEFAULT = Rule(
    "default", "any model whose stop token closes the turn as the template does", (), _concat
)
_QWEN3 = Rule("qwen3", "Qwen3, Qwen3.5, Qwen3-Next, Nemotron-3", ("<|im_end|>", "\n"), _qwen3)
_GLM47 = Rule("glm47", "GLM-4.5, GLM-4.6, GLM-4.7, GLM-5", ("<|observation|>", "<|user|>"), _glm47)

RULES: dict[str, Rule] = {
    "default": _DEFAULT,
    "qwen3": _QWEN3,
    "qwen35": _QWEN3,
    "qwennext": _QWEN3,
    "nemotron3": _QWEN3,
    "glm47": _GLM47,
    "glm45": _GLM47,
    "glm5": _GLM47,
}

# How many trailing checkpoint tokens a rule may drop (reported in metadata).
MAX_TRIM_TOKENS = {"glm47": 1}


class Tito:
    """A loaded tokenizer, its template and boundary rule."""

    def __init__(
        self, tokenizer: Any, rule: Rule, template_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.rule = rule
        self.template_kwargs = dict(template_kwargs or {})
        self.max_trim_tokens = MAX_TRIM_TOKENS.get(rule.name, 0)
        # A fast tokenizer's Rust core, called directly: transformers' own
        # encode wraps the same call in a layer of Python per turn. Without
        # that wrapper nothing turns off a truncation or padding saved in
        # tokenizer.json, so it is turned off here: a prompt is never cut or padded.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        # The same ids without the character offsets, which cost time and are
        # never used (tokenizers has it since 0.20, the [tito] extra asks for 0.21).
        self._encode_fast = self._backend.encode_batch_fast if self._backend else None
        self._special = {token: self._single_id(token) for token in rule.tokens}

    @classmethod
    def load(
        cls,
        name_or_path: str,
        rule_name: str = "default",
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> Tito:
        """Load a tokenizer; ``ValueError`` names what is wrong."""
        # Only the tokenizer is used: transformers' notice that no deep-learning
        # framework is installed is noise in our log.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # transformers raises many kinds
            raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from None
        if chat_template is not None:
            tokenizer.chat_template = Path(chat_template).read_text()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {name_or_path!r} has no chat template (set CHAT_TEMPLATE)")
        try:
            rule = RULES[rule_name]
        except KeyError:
            raise ValueError(f"unknown TITO_MODEL {rule_name!r}") from None
        return cls(tokenizer, rule, template_kwargs)

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the {self.rule.name} boundary rule needs {token!r} to be one token; "
                f"this tokenizer makes it {len(ids)}"
            )
        return ids[0]

    # -- rendering -----------------------------------------------------------

    def _kwargs(self, request_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        if not request_kwargs:
            return self.template_kwargs
        return {**self.template_kwargs, **request_kwargs}

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation_prompt: bool,
        kwargs: dict[str, Any],
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja errors and the template's raise_exception
            raise errors.template_failed(str(exc)) from None

    def encode(self, text: str) -> array:
        if self._encode_fast is not None:
            ids = self._encode_fast([text], add_special_tokens=False)[0].ids
        else:  # a slow (pure Python) tokenizer
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return array(TOKEN_TYPECODE, ids)

    # -- the two cases of a turn -------------------------------------------------

    def first_turn(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        request_kwargs: dict[str, Any] | None = None,
    ) -> array:
        """The whole prompt: the template over ``messages`` with the generation prompt."""
        return self.encode(self.render(messages, tools, True, self._kwargs(request_kwargs)))

    def next_turn(
        self,
        checkpoint: array,
        last_assistant: dict[str, Any],
        appended: list[dict[str, Any]],
        tools: list[Any] | None,
        request_kwargs: dict[str, Any] | None = None,
        first_index: int = 0,
    ) -> array:
        """``checkpoint`` (boundary rule applied) + the ids of the ``appended`` messages.

        ``first_index`` is the position of ``appended[0]`` in the request (for
        the error that names a message whose render is not append-only).
        """
        kwargs = self._kwargs(request_kwargs)
        # No reasoning in the dummy assistant: a template that drops earlier
        # reasoning once a user message follows (Qwen3's stock one) would
        # otherwise render the prefix differently with and without the appended.
        dummy = {"role": "assistant", "content": ""}
        if last_assistant.get("tool_calls"):
            dummy["tool_calls"] = last_assistant["tool_calls"]
        prefix = [_DUMMY_SYSTEM, dummy]
        base = self.render(prefix, tools, False, kwargs)
        full = self.render(prefix + appended, tools, True, kwargs)
        if not full.startswith(base):
            self._raise_not_append_only(prefix, appended, tools, kwargs, first_index)
        ids = self.rule.apply(checkpoint, self._special)
        out = array(TOKEN_TYPECODE, ids)
        out.extend(self.encode(full[len(base) :]))
        return out

    def _raise_not_append_only(
        self,
        prefix: list[dict[str, Any]],
        appended: list[dict[str, Any]],
        tools: list[Any] | None,
        kwargs: dict[str, Any],
        first_index: int,
    ) -> None:
        previous = self.render(prefix, tools, False, kwargs)
        for k, message in enumerate(appended):
            current = self.render(prefix + appended[: k + 1], tools, k == len(appended) - 1, kwargs)
            if not current.startswith(previous):
                raise errors.render_not_append_only(first_index + k, message.get("role"))
            previous = current
        # Each message alone appends; together with the generation prompt they do not.
        raise errors.render_not_append_only(
            first_index + len(appended) - 1, appended[-1].get("role")
        )


def tito_from_settings(
    tokenizer: str | None,
    tito_model: str,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> Tito | None:
    """The configured ``Tito``, or None (TITO off) when no tokenizer is set."""
    if tokenizer is None:
        log.info("TITO (token-in, token-out) is off: no TOKENIZER set, the backend tokenizes")
        return None
    tito = Tito.load(tokenizer, tito_model, chat_template, chat_template_kwargs)
    log.info(
        "TITO (token-in, token-out) is on: tokenizer %s, boundary rule %s (%s)",
        tokenizer,
        tito.rule.name,
        tito.rule.families,
    )
    return tito
