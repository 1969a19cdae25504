"""The chat template rendered without transformers' per-call wrapper.

``tokenizer.apply_chat_template`` spends about as long around the template as in
it: it rebuilds every message as plain data, and renders in a sandbox whose
checks run on every attribute access. TITO renders on every turn, so here the
operator's template (from the tokenizer or ``CHAT_TEMPLATE``: trusted
configuration, not client input) is compiled once in a plain jinja
environment with the same settings, filters and globals, and called with what
transformers would pass it: the messages without their ``None``-valued keys,
``reasoning_content`` also under ``thinking`` (and filled from ``thinking`` or
``reasoning``), the tokenizer's special tokens, then the kwargs.

``compile_fast`` checks the result against ``apply_chat_template`` on a probe
conversation (tools, reasoning, tool calls, a ``None`` content, with and
without the generation prompt) and returns None when anything differs (a
transformers version that prepares messages otherwise): the caller then keeps
``apply_chat_template``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

log = logging.getLogger("rollout_sessions")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Render = Callable[[list[dict[str, Any]], "list[Any] | None", bool, dict[str, Any]], str]


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2 import nodes

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers
        uses the tag to find assistant tokens; a render needs only the text)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    dict_attributes = frozenset(dir(dict))
    missing = object()

    class Environment(jinja2.Environment):
        def getattr(self, obj: Any, attribute: str) -> Any:
            # ``message.role``: jinja tries the attribute first and, failing (an
            # exception), the key, then gives undefined. A name that is no dict
            # attribute can only be a key: look it up, with the same result and
            # no exceptions raised.
            if type(obj) is dict and attribute not in dict_attributes:
                value = obj.get(attribute, missing)
                if value is missing:
                    return self.undefined(obj=obj, name=attribute)
                return value
            return super().getattr(obj, attribute)

    env = Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    return env


def _prepare(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to a template."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def compile_fast(tokenizer: Any, probe: list[dict[str, Any]], tools: list[Any]) -> Render | None:
    """A render function equal to ``apply_chat_template`` (``tokenize=False``) on the
    probe, or None."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        return None
    try:
        template = _environment().from_string(source)
    except Exception as exc:  # a template only transformers' environment compiles
        log.info("TITO renders through apply_chat_template (%s)", exc)
        return None
    special = dict(tokenizer.special_tokens_map)

    def render(
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation_prompt: bool,
        kwargs: dict[str, Any],
    ) -> str:
        return template.render(
            messages=[_prepare(m) for m in messages],
            tools=tools or None,
            documents=None,
            add_generation_prompt=generation_prompt,
            **{**special, **kwargs},
        )

    for messages, tool_list in ((probe, tools), (probe[:2], None), (probe[:3], tools)):
        for generation_prompt in (False, True):
            try:
                expected = tokenizer.apply_chat_template(
                    messages,
                    tools=tool_list,
                    add_generation_prompt=generation_prompt,
                    tokenize=False,
                )
            except Exception:
                return None  # nothing to compare with
            try:
                got = render(messages, tool_list, generation_prompt, {})
            except Exception:
                got = None
            if got != expected:
                log.info("TITO renders through apply_chat_template (a probe render differs)")
                return None
    return render
