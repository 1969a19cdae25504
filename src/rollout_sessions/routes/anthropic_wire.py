"""Anthropic Messages and chat completions: the translation, both ways.

Pure functions, no I/O; ``messages.py`` drives a chat turn with them.

Request (``to_chat``), one Anthropic request to one chat request:

- ``system`` (a string or text blocks) and ``role: system`` messages become
  system messages; a user's text blocks one user message, its
  ``tool_result`` blocks one ``tool`` message each (``tool_call_id``), in
  order; an assistant's text blocks its ``content``, its ``thinking`` blocks
  its ``reasoning_content``, its ``tool_use`` blocks its ``tool_calls``
  (``arguments``: the JSON of ``input``). Several text blocks are joined
  with a newline, as chat backends flatten text parts.
- ``tools`` (``name``, ``description``, ``input_schema``) become function
  tools; ``tool_choice`` ``auto``/``any``/``tool``/``none`` becomes
  ``auto``/``required``/the named function/``none``, and
  ``disable_parallel_tool_use`` ``parallel_tool_calls: false``;
  ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` pass on,
  ``stop_sequences`` as ``stop``; ``thinking`` sets
  ``chat_template_kwargs.enable_thinking`` (``disabled``: false, any other
  type: true).
- Fields Anthropic defines for its own service (``metadata``,
  ``service_tier``, ``cache_control``, ...) are dropped; fields it does
  not define pass on as they are (extra sampling parameters, as on the
  chat route).
- What the server cannot carry is a 400 naming it: image, document and
  other non-text blocks, redacted thinking, server tools, MCP servers, a
  container, structured output, a final assistant message (prefill).

Answer (``to_message``): a thinking block from ``reasoning_content``, a
text block from ``content`` (none when empty), a ``tool_use`` block per tool
call (``input``: its ``arguments`` parsed, which must be a JSON object, else
502); ``stop_reason`` ``max_tokens`` (finish ``length``), ``tool_use``,
``stop_sequence`` (a stop the backend says it matched) or ``end_turn``;
``usage`` the prompt and completion ids counted. ``sse_events`` writes the
same message as Anthropic's event stream, ``error_body`` an error in
Anthropic's shape.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from rollout_sessions.upstream.answer import ParsedAnswer
from rollout_sessions.web import errors
from rollout_sessions.web.errors import ApiError

# Anthropic's fields for its own service: nothing for a chat backend.
_DROPPED = frozenset(
    {
        "metadata",
        "service_tier",
        "cache_control",
        "inference_geo",
        "speed",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
    }
)
# Anthropic's fields that ask for something a chat backend cannot do.
_REFUSED = ("mcp_servers", "container", "context_management")
# The fields translated here; any other passes on as it is.
_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
    }
)
_SAMPLING = ("temperature", "top_p", "top_k")
_NUMBER = (int, float)

# Anthropic error types by status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def invalid(detail: str) -> ApiError:
    return ApiError(400, f"invalid Anthropic request: {detail}")


def not_carried(where: str, what: str) -> ApiError:
    return invalid(f"{where} is {what}, which cannot be carried to a chat-completions backend")


class Translated:
    """A chat request made from an Anthropic one, and what its answer needs."""

    __slots__ = ("chat", "model", "stops")

    def __init__(self, chat: dict[str, Any], model: Any, stops: list[str]) -> None:
        self.chat = chat
        self.model = model
        self.stops = stops


def to_chat(body: Any, count_only: bool = False) -> Translated:
    """The chat request for an Anthropic Messages request (``count_only``: a
    ``count_tokens`` request, which has no ``max_tokens``); 400 naming the defect."""
    if type(body) is not dict:
        raise invalid("the body must be a JSON object")
    for key in _REFUSED:
        if body.get(key):
            raise invalid(f"{key} cannot be carried to a chat-completions backend")
    output = body.get("output_config")
    if output is not None and (type(output) is not dict or output.get("format") is not None):
        raise invalid("output_config.format (structured output) cannot be carried")
    model = body.get("model")
    if model is not None and type(model) is not str:
        raise invalid("model must be a string")
    chat: dict[str, Any] = {}
    if model is not None:
        chat["model"] = model
    chat["messages"] = _messages(body.get("messages"), body.get("system"))
    max_tokens = body.get("max_tokens")
    if max_tokens is None and not count_only:
        raise invalid("max_tokens is required")
    if max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            raise invalid("max_tokens must be a positive integer")
        chat["max_tokens"] = max_tokens
    for key in _SAMPLING:
        value = body.get(key)
        if value is not None:
            if type(value) not in _NUMBER:
                raise invalid(f"{key} must be a number")
            chat[key] = value
    stops = body.get("stop_sequences")
    if stops is not None:
        if type(stops) is not list or not all(type(s) is str for s in stops):
            raise invalid("stop_sequences must be a list of strings")
        if stops:
            chat["stop"] = stops
    stream = body.get("stream")
    if stream is not None:
        if type(stream) is not bool:
            raise invalid("stream must be a boolean")
        chat["stream"] = stream
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, chat)
    for key, value in body.items():
        if key not in _TRANSLATED and key not in _DROPPED and key not in _REFUSED:
            chat[key] = value  # not Anthropic's: passes on, as on the chat route
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if type(thinking) is dict else None
        if type(kind) is not str:
            raise invalid("thinking must be an object with a type")
        kwargs = chat.get("chat_template_kwargs")
        kwargs = dict(kwargs) if type(kwargs) is dict else {}
        kwargs["enable_thinking"] = kind != "disabled"
        chat["chat_template_kwargs"] = kwargs
    return Translated(chat, model, stops or [])


# -- messages ---------------------------------------------------------------------


def _messages(messages: Any, system: Any) -> list[dict[str, Any]]:
    if type(messages) is not list or not messages:
        raise invalid("messages must be a non-empty list of message objects")
    out: list[dict[str, Any]] = []
    if system is not None:
        text = _text(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    # Where a defect is, is written only for its error: this runs on every turn.
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise invalid(f"messages[{i}] must be an object")
        role = message.get("role")
        content = message.get("content")
        if role == "user":
            if type(content) is str:
                out.append({"role": "user", "content": content})
            else:
                out += _user(content, i)
        elif role == "assistant":
            out.append(_assistant(content, i))
        elif role == "system":
            text = _text(content, f"messages[{i}].content")
            out.append({"role": "system", "content": text})
        else:
            raise invalid(f"messages[{i}].role must be user or assistant, not {role!r}")
    if messages[-1].get("role") == "assistant":
        raise invalid(
            "the last message is an assistant message (a prefill to continue), "
            "which a chat-completions turn cannot carry"
        )
    return out


def _at(i: int, j: int) -> str:
    return f"messages[{i}].content[{j}]"


def _blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if type(content) is not list:
        raise invalid(f"messages[{i}].content must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if type(block) is not dict or type(block.get("type")) is not str:
            raise invalid(f"{_at(i, j)} must be a content block with a type")
    return content


def _block_text(block: dict[str, Any], i: int, j: int) -> str:
    text = block.get("text")
    if type(text) is not str:
        raise invalid(f"{_at(i, j)}.text must be a string")
    return text


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined (a system prompt, a tool result)."""
    if type(content) is str:
        return content
    if type(content) is not list:
        raise invalid(f"{where} must be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if type(block) is dict else None
        if kind != "text":
            raise not_carried(f"{where}[{j}]", f"a {kind} block" if kind else "not a text block")
        text = block.get("text")
        if type(text) is not str:
            raise invalid(f"{where}[{j}].text must be a string")
        parts.append(text)
    return "\n".join(parts)


def _user(content: Any, i: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(_blocks(content, i)):
        kind = block["type"]
        if kind == "text":
            texts.append(_block_text(block, i, j))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            call_id = block.get("tool_use_id")
            if type(call_id) is not str:
                raise invalid(f"{_at(i, j)}.tool_use_id must be a string")
            result = block.get("content")
            if type(result) is not str:
                result = "" if result is None else _text(result, f"{_at(i, j)}.content")
            out.append({"role": "tool", "tool_call_id": call_id, "content": result})
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise invalid(f"{_at(i, j)}: a {kind} block belongs in an assistant message")
        else:
            raise not_carried(_at(i, j), f"a {kind} block")
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(content: Any, i: int) -> dict[str, Any]:
    if type(content) is str:
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, i)):
        kind = block["type"]
        if kind == "text":
            texts.append(_block_text(block, i, j))
        elif kind == "tool_use":
            calls.append(_tool_call(block, i, j))
        elif kind == "thinking":
            thought = block.get("thinking")
            if type(thought) is not str:
                raise invalid(f"{_at(i, j)}.thinking must be a string")
            reasoning.append(thought)
        elif kind == "tool_result":
            raise invalid(f"{_at(i, j)}: a tool_result block belongs in a user message")
        else:
            raise not_carried(_at(i, j), f"a {kind} block")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(block: dict[str, Any], i: int, j: int) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if type(call_id) is not str or type(name) is not str:
        raise invalid(f"{_at(i, j)}: a tool_use block needs a string id and name")
    if type(arguments) is not dict:
        raise invalid(f"{_at(i, j)}.input must be an object")
    try:
        text = orjson.dumps(arguments).decode()
    except orjson.JSONEncodeError as exc:
        raise invalid(f"{_at(i, j)}.input cannot be written as JSON ({exc})") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


# -- tools ---------------------------------------------------------------------------


def _tools(tools: Any) -> list[dict[str, Any]]:
    if type(tools) is not list:
        raise invalid("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if type(tool) is not dict:
            raise invalid(f"{at} must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise not_carried(at, f"a {kind} tool (one Anthropic's service runs)")
        name, schema = tool.get("name"), tool.get("input_schema")
        if type(name) is not str or type(schema) is not dict:
            raise invalid(f"{at} needs a string name and an input_schema object")
        function: dict[str, Any] = {"name": name}
        description = tool.get("description")
        if description is not None:
            if type(description) is not str:
                raise invalid(f"{at}.description must be a string")
            function["description"] = description
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if type(choice) is dict else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if type(name) is not str:
            raise invalid("tool_choice of type tool needs a name")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise invalid("tool_choice.type must be auto, any, tool or none")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


# -- answers -------------------------------------------------------------------------


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def to_message(parsed: ParsedAnswer, model: Any, stops: list[str]) -> dict[str, Any]:
    """The Anthropic message for a checked chat answer; 502 when a tool call's
    arguments are not a JSON object."""
    message = parsed.message
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message["content"]
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or ()
    for i, call in enumerate(calls):
        content.append(_tool_use(call, i))
    reason, matched = parsed.finish
    stop_sequence = None
    if reason == "length":
        stop_reason = "max_tokens"
    elif calls:
        stop_reason = "tool_use"
    elif type(matched) is str and matched in stops:
        stop_reason, stop_sequence = "stop_sequence", matched
    else:
        stop_reason = "end_turn"
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model if model is not None else "",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": len(parsed.prompt_ids),
            "output_tokens": len(parsed.completion_ids),
        },
    }


def _tool_use(call: dict[str, Any], i: int) -> dict[str, Any]:
    where = f"choices[0].message.tool_calls[{i}]"
    function = call.get("function")
    if type(function) is not dict or type(function.get("name")) is not str:
        raise errors.upstream_malformed(f"{where}.function has no name")
    arguments = function.get("arguments")
    if type(arguments) is not str:
        raise errors.upstream_malformed(f"{where}.function.arguments is not a string")
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise errors.upstream_malformed(
            f"{where}.function.arguments is not JSON ({exc}): {arguments[:200]!r}"
        ) from None
    if type(value) is not dict:
        raise errors.upstream_malformed(
            f"{where}.function.arguments is not a JSON object: {arguments[:200]!r}"
        )
    call_id = call.get("id")
    return {
        "type": "tool_use",
        "id": call_id if type(call_id) is str and call_id else f"toolu_{i}",
        "name": function["name"],
        "input": value,
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def sse_events(message: dict[str, Any]) -> bytes:
    """The whole message as Anthropic's event stream: ``message_start``, per block
    ``content_block_start``, its delta, ``content_block_stop``, then
    ``message_delta`` (stop reason, usage) and ``message_stop``."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 0}
    out = [_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "thinking":
            empty = {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": block["thinking"]}
        elif kind == "text":
            empty = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            empty = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            partial = orjson.dumps(block["input"]).decode()
            delta = {"type": "input_json_delta", "partial_json": partial}
        out.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": empty},
            )
        )
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        out.append(_event("content_block_delta", event))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": message["stop_reason"],
                    "stop_sequence": message["stop_sequence"],
                },
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    out.append(_event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


# -- errors ----------------------------------------------------------------------------


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}}
    )


def upstream_message(status: int, body: bytes) -> str:
    """What a non-200 upstream answer says, for an Anthropic error."""
    detail: Any = None
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    if type(doc) is dict:
        err = doc.get("error")
        detail = err.get("message") if type(err) is dict else err
        if detail is None:
            detail = doc.get("message")
    if type(detail) is not str:
        detail = body[:500].decode("utf-8", "replace")
    return f"backend answered {status}: {detail}" if detail else f"backend answered {status}"
