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
  and the render without them (kept between turns, ``_prefix_key``) is cut
  off as text; the generation prompt comes once, at the end.

Boundary rules (``TITO_MODEL``, one per model family; docs/tito.md has the table),
for where the checkpoint meets the appended ids:

- ``default``: plain concatenation (the stop token is exactly how the
  template closes a turn);
- a ``closer`` (the stop token, then what the template writes after it): a
  checkpoint that ends with the stop token gets the rest. ``qwen3``
  (``qwennext``), ``qwen35``, ``nemotron3``: ``<|im_end|>`` then a newline;
  ``minimax_m25``, ``minimax_m27``: ``[e~[`` then a newline; ``kimi25``,
  ``kimi26`` (``<|im_end|>``), ``deepseekv32``, ``deepseekv4``
  (``<｜end▁of▁sentence｜>``), ``inkling`` (``<|content_model_end_sampling|>``):
  nothing follows, so they concatenate;
- ``openers``: ``glm47`` (``glm45``, ``glm5``) drops a final
  ``<|observation|>`` or ``<|user|>``: GLM's stop token is also the opener the
  template renders for the next message.

``auto`` picks the family from the tokenizer (``detect``) and logs why.
DeepSeek-V3.2 and V4 ship no jinja template: ``tito.encoders`` renders them.
A jinja template is compiled once and called directly (``tito.jinja``), checked
against ``apply_chat_template`` at load.

The tokenizer is loaded once with ``transformers.AutoTokenizer``;
``CHAT_TEMPLATE`` (a jinja file) replaces its template and
``CHAT_TEMPLATE_KWARGS`` (a JSON object) is passed to every render, updated
by a request's own ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rollout_sessions.tito.encoders import ENCODERS
from rollout_sessions.trajectory.store import TOKEN_TYPECODE
from rollout_sessions.web import errors

log = logging.getLogger("rollout_sessions")

_DUMMY_SYSTEM = {"role": "system", "content": "dummy system"}


@dataclass(frozen=True, slots=True)
class Rule:
    """How a stored checkpoint's end meets the ids of the messages appended to it.

    ``closer``: what the template writes to close an assistant message, the
    model's stop token first (``("<|im_end|>", "\\n")`` for Qwen3). A checkpoint
    that ends inside it (the model stopped at the stop token; the template's
    trailing text was never generated) gets the rest of it. ``openers``: stop
    tokens that are also the opener the template renders for the next
    message (GLM); a final one is dropped, the appended render writes it again.
    """

    name: str
    families: str
    closer: tuple[str, ...] = ()
    openers: tuple[str, ...] = ()
    # Tool-call arguments go to the template as objects (a JSON string parsed,
    # as SGLang does): these families' templates iterate them as mappings.
    object_arguments: bool = False
    encoder: str | None = None  # the template is code (``tito.encoders``), not jinja

    @property
    def tokens(self) -> tuple[str, ...]:
        """Special tokens it looks at, resolved to ids when the tokenizer loads."""
        return self.closer + self.openers

    @property
    def max_trim_tokens(self) -> int:
        """How many trailing checkpoint tokens it may drop (reported in metadata)."""
        return 1 if self.openers else 0

    def apply(self, ids: array, special: dict[str, int]) -> array:
        """The checkpoint as the appended ids continue it (``ids`` itself when unchanged)."""
        if not ids:
            return ids
        if self.openers:
            if ids[-1] in {special[t] for t in self.openers}:
                return ids[:-1]
            return ids
        closer = [special[t] for t in self.closer]
        # Longest part of the closer the checkpoint ends with, short of all of it.
        for k in range(len(closer) - 1, 0, -1):
            if len(ids) >= k and ids[-k:].tolist() == closer[:k]:
                out = array(TOKEN_TYPECODE, ids)
                out.extend(closer[k:])
                return out
        return ids


_DEFAULT = Rule("default", "any model whose stop token closes the turn as the template does")
_QWEN3 = Rule("qwen3", "Qwen3, Qwen3-Next", closer=("<|im_end|>", "\n"))
_QWEN35 = Rule("qwen35", "Qwen3.5", closer=("<|im_end|>", "\n"), object_arguments=True)
_NEMOTRON3 = Rule("nemotron3", "Nemotron-3", closer=("<|im_end|>", "\n"), object_arguments=True)
_GLM47 = Rule(
    "glm47",
    "GLM-4.5, GLM-4.6, GLM-4.7, GLM-5",
    openers=("<|observation|>", "<|user|>"),
    object_arguments=True,
)
_KIMI25 = Rule("kimi25", "Kimi K2.5", closer=("<|im_end|>",))
_KIMI26 = Rule("kimi26", "Kimi K2.6", closer=("<|im_end|>",))
_MINIMAX_M25 = Rule("minimax_m25", "MiniMax-M2.5", closer=("[e~[", "\n"), object_arguments=True)
_MINIMAX_M27 = Rule("minimax_m27", "MiniMax-M2.7", closer=("[e~[", "\n"), object_arguments=True)
_DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
_DEEPSEEKV32 = Rule("deepseekv32", "DeepSeek-V3.2", closer=(_DEEPSEEK_EOS,), encoder="deepseekv32")
_DEEPSEEKV4 = Rule("deepseekv4", "DeepSeek-V4", closer=(_DEEPSEEK_EOS,), encoder="deepseekv4")
_INKLING = Rule(
    "inkling",
    "Inkling, Inkling-Small",
    closer=("<|content_model_end_sampling|>",),
    object_arguments=True,
)

RULES: dict[str, Rule] = {
    "default": _DEFAULT,
    "qwen3": _QWEN3,
    "qwen35": _QWEN35,
    "qwennext": _QWEN3,
    "nemotron3": _NEMOTRON3,
    "glm47": _GLM47,
    "glm45": _GLM47,
    "glm5": _GLM47,
    "kimi25": _KIMI25,
    "kimi26": _KIMI26,
    "minimax_m25": _MINIMAX_M25,
    "minimax_m27": _MINIMAX_M27,
    "deepseekv32": _DEEPSEEKV32,
    "deepseekv4": _DEEPSEEKV4,
    "inkling": _INKLING,
}
AUTO = "auto"

# How many trailing checkpoint tokens a rule may drop (reported in metadata).
MAX_TRIM_TOKENS = {name: rule.max_trim_tokens for name, rule in RULES.items()}


def _with_object_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with tool-call arguments that are JSON objects as text parsed
    (copies of the messages that change; the list itself when none does)."""
    out = None
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not calls:
            continue
        new_calls = None
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if not isinstance(arguments, str):
                continue
            try:
                parsed = json.loads(arguments)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                if new_calls is None:
                    new_calls = list(calls)
                new_calls[k] = {**call, "function": {**function, "arguments": parsed}}
        if new_calls is not None:
            if out is None:
                out = list(messages)
            out[i] = {**message, "tool_calls": new_calls}
    return messages if out is None else out


# Characters of dummy-prefix renders (and their keys) kept per Tito, oldest dropped
# first: a client sending other tools on every turn costs at most this much.
PREFIX_CHARS_KEPT = 4 << 20


def _prefix_key(
    dummy: dict[str, Any], tools: list[Any] | None, kwargs: dict[str, Any]
) -> bytes | None:
    """What the dummy prefix's render depends on, as bytes; None when it has no JSON
    form (such a prefix is rendered every time)."""
    try:
        return orjson.dumps((dummy.get("tool_calls"), tools, kwargs))
    except TypeError:  # orjson's error for what it cannot serialize
        return None


class Tito:
    """A loaded tokenizer, its template (jinja, or an encoder written as code) and boundary rule."""

    def __init__(
        self, tokenizer: Any, rule: Rule, template_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.rule = rule
        self.template_kwargs = dict(template_kwargs or {})
        self.max_trim_tokens = rule.max_trim_tokens
        self.encoder = ENCODERS[rule.encoder] if rule.encoder else None
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
        self._boundary = self._bind_boundary()
        self._fast_render = None if self.encoder is not None else self._compile_fast()
        # The dummy prefix's render, by what it depends on (``_prefix_key``): a
        # rollout's turns share their tools and mostly their tool calls' shape, so
        # most turns render the template once instead of twice.
        self._prefixes: dict[bytes, str] = {}
        self._prefix_chars = 0
        self._prefixes_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        name_or_path: str,
        rule_name: str = "default",
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> Tito:
        """Load a tokenizer; ``ValueError`` names what is wrong.

        ``rule_name`` ``"auto"`` picks the rule from the tokenizer (``detect``)
        and logs the choice and why.
        """
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
        if rule_name == AUTO:
            rule_name, why = detect(tokenizer, name_or_path)
            if rule_name == "default":
                log.warning(
                    "TITO_MODEL=auto: %s; using the default boundary rule (concatenate). "
                    "Set TITO_MODEL if this model's stop token or the text its template "
                    "writes after it needs a rule",
                    why,
                )
            else:
                log.info("TITO_MODEL=auto chose %s: %s", rule_name, why)
        try:
            rule = RULES[rule_name]
        except KeyError:
            raise ValueError(f"unknown TITO_MODEL {rule_name!r}") from None
        if rule.encoder is not None:
            if chat_template is not None:
                raise ValueError(
                    f"TITO_MODEL {rule_name} renders with its encoder (its template is code): "
                    "CHAT_TEMPLATE does not apply to it"
                )
        elif not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {name_or_path!r} has no chat template (set CHAT_TEMPLATE)")
        return cls(tokenizer, rule, template_kwargs)

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the {self.rule.name} boundary rule needs {token!r} to be one token; "
                f"this tokenizer makes it {len(ids)}"
            )
        return ids[0]

    def _bind_boundary(self) -> Any:
        """``rule.apply`` with the ids bound: a few comparisons per turn."""
        special = self._special
        if self.rule.openers:
            openers = frozenset(special[t] for t in self.rule.openers)

            def drop(ids: array) -> array:
                return ids[:-1] if ids and ids[-1] in openers else ids

            return drop
        closer = [special[t] for t in self.rule.closer]
        if len(closer) < 2:
            return lambda ids: ids
        stop, rest = closer[0], closer[1:]
        if len(rest) == 1:

            def complete(ids: array) -> array:
                if ids and ids[-1] == stop:
                    out = array(TOKEN_TYPECODE, ids)
                    out.append(rest[0])
                    return out
                return ids

            return complete
        return lambda ids: self.rule.apply(ids, special)

    def _compile_fast(self) -> Any:
        """The template compiled once, checked against ``apply_chat_template`` (``tito.jinja``)."""
        from rollout_sessions.tito.check import REPORT_CONVERSATION, REPORT_TOOLS
        from rollout_sessions.tito.jinja import compile_fast

        probe = list(REPORT_CONVERSATION)
        probe[2] = {**probe[2], "content": None}  # transformers drops None-valued keys
        if self.rule.object_arguments:
            probe = _with_object_arguments(probe)
        return compile_fast(self.tokenizer, probe, REPORT_TOOLS)

    def apply_boundary(self, ids: array) -> array:
        """The checkpoint ``ids`` as the next turn's appended ids continue it."""
        return self._boundary(ids)

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
        if self.rule.object_arguments:
            messages = _with_object_arguments(messages)
        try:
            if self.encoder is not None:
                return self.encoder.render(messages, tools, generation_prompt, kwargs)
            if self._fast_render is not None:
                return self._fast_render(messages, tools, generation_prompt, kwargs)
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja errors, the template's raise_exception, encoder errors
            raise errors.template_failed(str(exc)) from None

    def encode(self, text: str) -> array:
        if self._encode_fast is not None:
            ids = self._encode_fast([text], add_special_tokens=False)[0].ids
        else:  # a slow (pure Python) tokenizer
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return array(TOKEN_TYPECODE, ids)

    def completion_text(
        self,
        messages: list[dict[str, Any]],
        reply: dict[str, Any],
        tools: list[Any] | None,
        kwargs: dict[str, Any] | None = None,
        trailing: bool = False,
    ) -> str:
        """What a model of this family generates for ``reply``: the template's
        rendering of it after the generation prompt, ending with the stop token.

        The text the template writes after the stop token is not generated
        (``trailing`` keeps it, as a model that generated it too); a stop token
        that is also the next message's opener is.
        """
        kwargs = self.template_kwargs if kwargs is None else kwargs
        prompt = self.render(messages, tools, True, kwargs)
        full = self.render([*messages, reply], tools, False, kwargs)
        rule = self.rule
        if full.startswith(prompt):
            body = full[len(prompt) :]
        else:  # the template renders this reply otherwise than its generation prompt opens it
            body = str(reply.get("content") or "") + "".join(rule.closer)
        if rule.openers:
            return body + (rule.openers[0] if reply.get("tool_calls") else rule.openers[-1])
        after = "".join(rule.closer[1:])
        if after and not trailing:
            body = body.removesuffix(after)
        return body

    # -- the two cases of a turn -------------------------------------------------

    def first_turn(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        request_kwargs: dict[str, Any] | None = None,
    ) -> array:
        """The whole prompt: the template over ``messages`` with the generation prompt."""
        return self.encode(self.render(messages, tools, True, self._kwargs(request_kwargs)))

    def appended_text(
        self,
        last_assistant: dict[str, Any],
        appended: list[dict[str, Any]],
        tools: list[Any] | None,
        kwargs: dict[str, Any],
        first_index: int = 0,
    ) -> str:
        """The text of only the ``appended`` messages and the generation prompt."""
        # No reasoning in the dummy assistant: a template that drops earlier
        # reasoning once a user message follows (Qwen3's stock one) would
        # otherwise render the prefix differently with and without the appended.
        dummy = {"role": "assistant", "content": ""}
        if last_assistant.get("tool_calls"):
            dummy["tool_calls"] = last_assistant["tool_calls"]
        prefix = [_DUMMY_SYSTEM, dummy]
        if self.encoder is not None:
            # The encoder writes each message's text in the context of the whole
            # list: the appended messages' text as a whole render has it.
            try:
                return self.encoder.render_appended(prefix, appended, tools, kwargs)
            except Exception as exc:
                raise errors.template_failed(str(exc)) from None
        full = self.render(prefix + appended, tools, True, kwargs)
        key = _prefix_key(dummy, tools, kwargs)
        base = self._prefixes.get(key) if key is not None else None
        if base is None or not full.startswith(base):
            # Rendered afresh when not kept, and when a kept one no longer leads (a
            # template that writes the date renders another prefix the next day).
            base = self.render(prefix, tools, False, kwargs)
            if not full.startswith(base):
                self._raise_not_append_only(prefix, appended, tools, kwargs, first_index)
            if key is not None:
                self._keep_prefix(key, base)
        return full[len(base) :]

    def _keep_prefix(self, key: bytes, text: str) -> None:
        size = len(key) + len(text)
        if size > PREFIX_CHARS_KEPT:
            return
        # ``tito_check`` builds prompts in a worker thread while the loop builds turns.
        with self._prefixes_lock:
            prefixes = self._prefixes
            old = prefixes.pop(key, None)
            if old is not None:
                self._prefix_chars -= len(key) + len(old)
            while self._prefix_chars + size > PREFIX_CHARS_KEPT:
                oldest = next(iter(prefixes))
                self._prefix_chars -= len(oldest) + len(prefixes.pop(oldest))
            prefixes[key] = text
            self._prefix_chars += size

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
        text = self.appended_text(
            last_assistant, appended, tools, self._kwargs(request_kwargs), first_index
        )
        out = self._boundary(checkpoint)
        if out is checkpoint:  # the rule changed nothing: the stored ids are not extended
            out = array(TOKEN_TYPECODE, checkpoint)
        out.extend(self.encode(text))
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


# -- detection ------------------------------------------------------------------------

# Name patterns, on the tokenizer's name with everything but letters and digits
# removed and lowercased ("moonshotai/Kimi-K2.5" -> "kimik25"); first match wins.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"kimik?26", "kimi26"),
    (r"kimik?25", "kimi25"),
    (r"minimaxm?27", "minimax_m27"),
    (r"minimaxm?25", "minimax_m25"),
    (r"deepseekv4", "deepseekv4"),
    (r"deepseekv32", "deepseekv32"),
    (r"inkling", "inkling"),
    (r"glm5", "glm5"),
    (r"glm4[5-7]", "glm47"),
    (r"nemotron3", "nemotron3"),
    (r"qwen35", "qwen35"),
    (r"qwen3next|qwennext", "qwennext"),
    (r"qwen3", "qwen3"),
)

# Special-token signatures: all of these single tokens in the vocabulary.
_TOKEN_SIGNATURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|im_assistant|>", "<|im_middle|>", "<|im_end|>"), "kimi"),
    (("]~b]", "[e~["), "minimax"),
    (("<|message_model|>", "<|content_model_end_sampling|>"), "inkling"),
    (("<｜User｜>", "<｜Assistant｜>", _DEEPSEEK_EOS), "deepseek"),
    (("[gMASK]", "<|assistant|>", "<|observation|>", "<|user|>"), "glm47"),
    (("<|im_start|>", "<|im_end|>"), "qwen3"),
)


def _name_key(name: str) -> str:
    last = [p for p in re.split(r"[/\\]", name) if p][-1:]
    return re.sub(r"[^a-z0-9]", "", "".join(last).lower())


def _model_type(name_or_path: str) -> str:
    """``model_type`` of a local checkpoint's config.json, if there is one."""
    config = Path(name_or_path) / "config.json"
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _is_single(tokenizer: Any, token: str) -> bool:
    vocab_id = tokenizer.convert_tokens_to_ids(token)
    if vocab_id is None or vocab_id == getattr(tokenizer, "unk_token_id", None):
        return False
    return tokenizer.encode(token, add_special_tokens=False) == [vocab_id]


def _has_rule_tokens(tokenizer: Any, rule: Rule) -> bool:
    return all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in rule.tokens)


def detect(tokenizer: Any, name_or_path: str = "") -> tuple[str, str]:
    """The ``TITO_MODEL`` for a tokenizer and why: from its name (or its
    checkpoint's ``model_type``), else its special tokens, else its template's
    text. ``("default", why)`` when no family matches."""
    name = name_or_path or getattr(tokenizer, "name_or_path", "") or ""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = ""
    for source, key in (
        (f"tokenizer name {name!r}", _name_key(name)),
        (f"config.json model_type {_model_type(name)!r}", _model_type(name).lower()),
    ):
        if not key:
            continue
        key = re.sub(r"[^a-z0-9]", "", key)
        for pattern, rule_name in _NAME_PATTERNS:
            if re.search(pattern, key):
                if _has_rule_tokens(tokenizer, RULES[rule_name]):
                    return rule_name, f"{source} matches {rule_name}"
                break
    for tokens, family in _TOKEN_SIGNATURES:
        if all(_is_single(tokenizer, t) for t in tokens):
            rule_name = _refine(family, tokenizer, template)
            if rule_name is not None:
                return rule_name, f"its special tokens {', '.join(tokens)} are {family}'s"
    for tokens, family in _TOKEN_SIGNATURES:
        if template and all(t in template for t in tokens):
            rule_name = _refine(family, tokenizer, template)
            if rule_name is not None and _has_rule_tokens(tokenizer, RULES[rule_name]):
                return rule_name, f"its chat template writes {', '.join(tokens)} ({family})"
    return "default", (
        f"tokenizer {name!r} is of no known model family (its name, special tokens and "
        "chat template match none)"
    )


def _refine(family: str, tokenizer: Any, template: str) -> str | None:
    """The rule of a family whose versions share tokens, told apart by the template."""
    if family == "kimi":
        # K2.6's template has the preserve_thinking switch K2.5's lacks.
        return "kimi26" if "preserve_thinking" in template else "kimi25"
    if family == "minimax":
        return "minimax_m27" if "MiniMax-M2.7" in template else "minimax_m25"
    if family == "deepseek":
        if template:
            return None  # V3/V3.1 ship a jinja template; V3.2 and V4 an encoder
        return "deepseekv4" if _is_single(tokenizer, "<｜latest_reminder｜>") else "deepseekv32"
    return family


def tito_from_settings(
    tokenizer: str | None,
    tito_model: str,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> Tito | None:
    """The configured ``Tito``, or None (TITO off) when no tokenizer is set.

    Also logs whether the template renders append-only (``report``).
    """
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
    from rollout_sessions.tito.check import log_append_only_report

    log_append_only_report(tito)
    return tito
