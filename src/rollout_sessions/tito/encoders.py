"""Chat templates written as code: DeepSeek V3.2 and V4 ship no jinja template.

Both models publish a Python encoder instead (``encoding_dsv32`` with
DeepSeek-V3.2, ``encoding_dsv4`` with DeepSeek-V4; SGLang serves them). The
encoders here are written from the format those encoders produce, so that
the same messages give the same text, hence the same ids:

- ``<｜begin▁of▁sentence｜>``, then the system message (its content, then
  the tool schemas when the request has ``tools``);
- a user message is ``<｜User｜>{content}``; the assistant turn that follows
  opens with ``<｜Assistant｜>`` and ``<think>`` (thinking mode) or
  ``</think>`` (chat mode): that is the generation prompt;
- an assistant message is ``{reasoning}</think>{content}{tool calls}`` and
  the stop token ``<｜end▁of▁sentence｜>``; the template writes nothing after
  it, so the boundary rule concatenates;
- tool calls are a DSML block (``<｜DSML｜function_calls>`` in V3.2,
  ``<｜DSML｜tool_calls>`` in V4) of ``invoke``/``parameter`` elements;
- V3.2 tool results are a ``<function_results>`` block after the assistant,
  then the next assistant opener (``\\n\\n<think>``); V4 folds tool results
  (``<tool_result>...</tool_result>``) and the user text after them into one
  user message.

Template kwargs: ``thinking_mode`` (``"thinking"``, the default, or
``"chat"``; ``enable_thinking`` and ``thinking`` booleans are accepted as in
SGLang), ``drop_thinking`` (default true, as published: the reasoning of
assistants before the last user message is dropped, so the render is not
append-only across user messages; ``false`` keeps it),
``add_default_bos_token`` (default true), and for V4 ``reasoning_effort``
(``"max"`` adds the published effort preamble; ``"high"`` or none add nothing).

``render(messages, tools, generation_prompt, kwargs)`` is the whole render;
``render_appended(prefix, appended, tools, kwargs)`` the text of only the
``appended`` messages (and the generation prompt) as the whole render of
``prefix + appended`` writes them, which is what TITO needs: each message's
text is computed in the context of the whole list, never diffed.
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
REMINDER = "<｜latest_reminder｜>"
DSML = "｜DSML｜"

# The prompt texts of the published encoders (the model was trained on them).
_V32_TOOLS = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:
<{dsml}function_calls>
...
</{dsml}function_calls>
<function_results>
...
</function_results>
{think}...thinking about results{end_think}
Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""  # noqa: E501

_V4_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think}), you MUST output your complete reasoning inside {think}...{end_think} BEFORE any tool calls or final response.

Otherwise, output directly after {end_think} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501

_V4_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_RESPONSE_FORMAT = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True, default=str)


def _text(content: Any) -> str:
    """A message's content as text: a string as it is, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text")
        )
    return str(content)


def _mode(kwargs: dict[str, Any]) -> tuple[bool, bool]:
    """(thinking, drop_thinking) from the template kwargs."""
    mode = kwargs.get("thinking_mode")
    if mode is None:
        for key in ("enable_thinking", "thinking"):
            if kwargs.get(key) is not None:
                mode = "thinking" if kwargs[key] else "chat"
                break
    if mode is None:
        mode = "thinking"
    if mode not in ("thinking", "chat"):
        raise ValueError(f"thinking_mode must be 'thinking' or 'chat', got {mode!r}")
    return mode == "thinking", bool(kwargs.get("drop_thinking", True))


def _dsml_parameters(arguments: Any, lenient: bool) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            if not lenient:
                raise ValueError("tool call arguments are not JSON") from None
            arguments = {"arguments": arguments}
    if not isinstance(arguments, dict):
        if not lenient:
            raise ValueError("tool call arguments must be a JSON object")
        arguments = {"arguments": arguments}
    return "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else _json(value)}</{DSML}parameter>"
        for key, value in arguments.items()
    )


def _tool_calls(calls: list[Any], block: str, lenient: bool) -> str:
    invokes = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else {}
        invokes.append(
            f'<{DSML}invoke name="{function.get("name")}">\n'
            f"{_dsml_parameters(function.get('arguments'), lenient)}\n</{DSML}invoke>"
        )
    return f"\n\n<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def _last_user(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _with_tools(messages: list[dict[str, Any]], tools: list[Any] | None) -> list[dict[str, Any]]:
    """The request's ``tools`` go into the system message, where the encoders read them."""
    if not tools:
        return messages
    out = list(messages)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "tools": tools}
    else:
        out.insert(0, {"role": "system", "content": "", "tools": tools})
    return out


class _Encoder:
    name = ""
    tools_template = ""  # how a message's ``tools`` are declared: dsml, think, end_think, schemas

    def pieces(
        self, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> list[tuple[int, str, str]]:
        """Per rendered message: (first source message index, its text, the text
        written after it only when it ends the render: the generation prompt)."""
        raise NotImplementedError

    def _extras(self, message: dict[str, Any]) -> str:
        """A system or developer message's tool declarations and response format."""
        text = ""
        tools = message.get("tools")
        if tools:
            schemas = "\n".join(_json(t.get("function", t)) for t in tools)
            text += "\n\n" + self.tools_template.format(
                dsml=DSML, think=THINK, end_think=END_THINK, schemas=schemas
            )
        if message.get("response_format"):
            text += "\n\n" + _RESPONSE_FORMAT.format(schema=_json(message["response_format"]))
        return text

    def _join(self, pieces: list[tuple[int, str, str]], generation_prompt: bool) -> str:
        parts = [body for _, body, _ in pieces]
        if generation_prompt and pieces:
            parts.append(pieces[-1][2])
        return "".join(parts)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation_prompt: bool,
        kwargs: dict[str, Any],
    ) -> str:
        pieces = self.pieces(_with_tools(messages, tools), kwargs)
        bos = BOS if kwargs.get("add_default_bos_token", True) else ""
        return bos + self._join(pieces, generation_prompt)

    def render_appended(
        self,
        prefix: list[dict[str, Any]],
        appended: list[dict[str, Any]],
        tools: list[Any] | None,
        kwargs: dict[str, Any],
    ) -> str:
        """The text of ``appended`` (and the generation prompt) in the render of
        ``prefix + appended``."""
        with_tools = _with_tools(prefix + appended, tools)
        # A system message inserted for the tools shifts every index by one.
        first = len(with_tools) - len(appended)
        pieces = [p for p in self.pieces(with_tools, kwargs) if p[0] >= first]
        return self._join(pieces, True)


class DeepSeekV32(_Encoder):
    name = "deepseekv32"
    tools_template = _V32_TOOLS

    def pieces(
        self, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> list[tuple[int, str, str]]:
        thinking, drop = _mode(kwargs)
        last_user = _last_user(messages)
        out = []
        for i, message in enumerate(messages):
            role = message.get("role")
            body, after = "", ""
            # The token that opens the next assistant turn's reasoning (or closes it).
            opener = THINK if thinking and (not drop or i >= last_user) else END_THINK
            if role == "system":
                body = _text(message.get("content")) + self._extras(message)
            elif role == "developer":
                if not message.get("content"):
                    raise ValueError(f"message {i}: a developer message needs content")
                text = self._extras(message)
                text += f"\n\n# The user's message is: {_text(message.get('content'))}"
                body, after = USER + text, ASSISTANT + opener
                if i + 1 < len(messages):
                    body, after = body + after, ""
            elif role == "user":
                # The next assistant turn's opener always follows a user message.
                body, after = USER + _text(message.get("content")), ASSISTANT + opener
                if i + 1 < len(messages):
                    body, after = body + after, ""
            elif role == "tool":
                start = i - 1
                while start >= 0 and messages[start].get("role") == "tool":
                    start -= 1
                owner = messages[start] if start >= 0 else {}
                calls = owner.get("tool_calls") or [] if owner.get("role") == "assistant" else []
                order = i - start
                if i != 0 and (owner.get("role") != "assistant" or len(calls) < order):
                    raise ValueError(f"message {i}: a tool result without its tool call")
                if order == 1:
                    body = "\n\n<function_results>"
                body += f"\n<result>{_text(message.get('content'))}</result>"
                if order == len(calls):
                    body += "\n</function_results>"
                    after = "\n\n" + opener
                    if i + 1 < len(messages):
                        body, after = body + after, ""
            elif role == "assistant":
                reasoning = ""
                if thinking and (not drop or i > last_user):
                    reasoning = (message.get("reasoning_content") or "") + END_THINK
                calls = message.get("tool_calls")
                tail = _tool_calls(calls, "function_calls", lenient=False) if calls else ""
                body = reasoning + _text(message.get("content")) + tail + EOS
            else:
                raise ValueError(f"message {i}: unknown role {role!r}")
            out.append((i, body, after))
        return out


class DeepSeekV4(_Encoder):
    name = "deepseekv4"
    tools_template = _V4_TOOLS

    def pieces(
        self, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> list[tuple[int, str, str]]:
        thinking, drop = _mode(kwargs)
        effort = kwargs.get("reasoning_effort")
        if effort not in (None, "max", "high"):
            raise ValueError(f"reasoning_effort must be 'max', 'high' or none, got {effort!r}")
        merged = _merge_tool_results(messages)
        if any(m.get("tools") for m in merged):
            drop = False  # with tools the published encoder keeps every reasoning block
        if thinking and drop:
            last = _last_user(merged)
            merged = [m for k, m in enumerate(merged) if k >= last or m["role"] != "developer"]
        last_user = _last_user(merged)
        out = []
        for i, message in enumerate(merged):
            role = message["role"]
            body = _V4_EFFORT_MAX if i == 0 and thinking and effort == "max" else ""
            if role == "system":
                body += _text(message.get("content")) + self._extras(message)
            elif role == "developer":
                if not message.get("content"):
                    raise ValueError("a developer message needs content")
                body += USER + _text(message.get("content")) + self._extras(message)
            elif role == "user":
                blocks = message.get("blocks")
                if blocks is not None:
                    body += USER + "\n\n".join(blocks)
                else:
                    body += USER + _text(message.get("content"))
            elif role == "latest_reminder":
                body += REMINDER + _text(message.get("content"))
            elif role == "assistant":
                calls = message.get("tool_calls")
                tail = _tool_calls(calls, "tool_calls", lenient=True) if calls else ""
                reasoning = ""
                if thinking and (not drop or i > last_user):
                    reasoning = (message.get("reasoning_content") or "") + END_THINK
                body += reasoning + _text(message.get("content")) + tail + EOS
            else:
                raise ValueError(f"unknown role {role!r}")
            after = ""
            if role in ("user", "developer"):
                opener = THINK if thinking and (not drop or i >= last_user) else END_THINK
                after = ASSISTANT + opener
                # The next assistant turn opens only where one follows (or at the end).
                following = merged[i + 1]["role"] if i + 1 < len(merged) else None
                if following in ("assistant", "latest_reminder"):
                    body, after = body + after, ""
                elif following is not None:
                    after = ""
            out.append((message["source"], body, after))
        return out


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: a tool result becomes a ``<tool_result>`` block of a
    user message, and consecutive user and tool messages fold into one user
    message whose blocks are joined by a blank line; within it the tool results
    are ordered as the last tool-calling assistant ordered its calls. Each
    merged message keeps the index of its first source message (``source``)."""
    merged: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("user", "tool"):
            if role == "tool":
                key = order.get(str(message.get("tool_call_id") or ""), 0)
                item: tuple[int | None, str] = (key, _tool_result(message))
            else:
                item = (None, _text(message.get("content")))
            if merged and merged[-1]["role"] == "user":
                merged[-1]["items"].append(item)
            else:
                merged.append({"role": "user", "source": i, "items": [item]})
            continue
        if role == "assistant" and message.get("tool_calls"):
            order = {}
            for k, call in enumerate(message["tool_calls"]):
                call_id = call.get("id") if isinstance(call, dict) else None
                if call_id:
                    order[str(call_id)] = k
        merged.append({**message, "source": i})
    for message in merged:
        if message["role"] == "user":
            message["blocks"] = _blocks(message.pop("items"))
    return merged


def _tool_result(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "\n\n".join(
            str(b.get("text", "")) if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
            for b in content
            if isinstance(b, dict)
        )
    return f"<tool_result>{'' if content is None else content}</tool_result>"


def _blocks(items: list[tuple[int | None, str]]) -> list[str]:
    """The texts of a merged user message; tool results sorted by call order
    (stable), each in one of the places tool results had."""
    results = [(key, text) for key, text in items if key is not None]
    if len(results) > 1:
        results.sort(key=lambda r: r[0])
    sorted_results = iter(text for _, text in results)
    return [text if key is None else next(sorted_results) for key, text in items]


ENCODERS: dict[str, _Encoder] = {"deepseekv32": DeepSeekV32(), "deepseekv4": DeepSeekV4()}
