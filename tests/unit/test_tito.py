"""Token-in, token-out, in process, with tokenizers built offline (testing/tokenizers.py).

The two claims:

- under an append-only template, the ids built turn by turn decode to the
  full render of the conversation (qwen3 and glm47 rules), even when the
  model's own ids are a non-canonical tokenization of its text;
- each turn's ids extend the previous checkpoint, also under a template that
  rewrites history (Qwen3's stock one drops earlier ``<think>`` blocks),
  where re-rendering the conversation would not.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import pytest

from rollout_sessions.echo.tokenized import TokenizedTemplate
from rollout_sessions.testing.tokenizers import build_tokenizer
from rollout_sessions.tito import RULES, Tito
from rollout_sessions.web.errors import ApiError

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        (family, template): build_tokenizer(root / f"{family}-{template}", family, template)
        for family, template in (
            ("qwen3", "append_only"),
            ("qwen3", "stock"),
            ("glm47", "append_only"),
        )
    }


def reply(turn: int, tool: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "" if tool else f"The answer is {turn * 7}.",
        "reasoning_content": f"Step {turn}: think about it.",
    }
    if tool:
        call = {"name": "lookup", "arguments": f'{{"query": "q{turn}"}}'}
        message["tool_calls"] = [{"id": f"c{turn}", "type": "function", "function": call}]
    return message


def run_conversation(
    tito: Tito, turns: int, drift: bool, follow_up: str = "tool"
) -> tuple[list[dict[str, Any]], list[array], list[array]]:
    """Turn by turn as the chat route does it: (messages, prompts, checkpoints)."""
    model = TokenizedTemplate(tito)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Find things, then answer."},
    ]
    prompts: list[array] = []
    checkpoints: list[array] = []
    for turn in range(turns):
        if not checkpoints:
            prompt = tito.first_turn(messages, TOOLS)
        else:
            tail_start = len(messages) - 1
            prompt = tito.next_turn(
                checkpoints[-1], messages[tail_start - 1], messages[tail_start:], TOOLS
            )
        answer = reply(turn, tool=turn < turns - 1)
        completion = model.completion_ids(messages, answer, TOOLS, drift=drift)
        prompts.append(prompt)
        checkpoints.append(prompt + array("i", completion))
        appended = (
            {"role": "tool", "tool_call_id": f"c{turn}", "content": f"result {turn}"}
            if follow_up == "tool"
            else {"role": "user", "content": f"And then {turn}?"}
        )
        messages = [*messages, answer, appended]
    return messages, prompts, checkpoints


@pytest.mark.parametrize(("family", "rule"), [("qwen3", "qwen3"), ("glm47", "glm47")])
@pytest.mark.parametrize("drift", [False, True])
def test_built_ids_decode_to_the_full_render(tokenizers, family, rule, drift):
    tito = Tito.load(str(tokenizers[(family, "append_only")]), rule)
    messages, prompts, _ = run_conversation(tito, turns=4, drift=drift)
    tokenizer = tito.tokenizer
    for k, prompt in enumerate(prompts):
        history = messages[: 2 + 2 * k]
        expected = tito.render(history, TOOLS, True, {})
        assert tokenizer.decode(prompt.tolist()) == expected


@pytest.mark.parametrize(
    ("family", "template", "rule", "follow_up"),
    [
        ("qwen3", "append_only", "qwen3", "tool"),
        ("qwen3", "stock", "qwen3", "tool"),
        ("qwen3", "stock", "qwen3", "user"),
        ("glm47", "append_only", "glm47", "tool"),
        ("glm47", "append_only", "glm47", "user"),
    ],
)
def test_every_turn_extends_the_previous_checkpoint(tokenizers, family, template, rule, follow_up):
    tito = Tito.load(str(tokenizers[(family, template)]), rule)
    _, prompts, checkpoints = run_conversation(tito, turns=5, drift=True, follow_up=follow_up)
    for k in range(1, len(prompts)):
        base = RULES[rule].apply(checkpoints[k - 1], tito._special)
        assert prompts[k][: len(base)] == base


def test_drift_gives_other_ids_for_the_same_text(tokenizers):
    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "qwen3")
    model = TokenizedTemplate(tito)
    messages = [{"role": "user", "content": "hi"}]
    answer = {"role": "assistant", "content": "A longer answer with several words."}
    canonical = model.completion_ids(messages, answer, None)
    drifted = model.completion_ids(messages, answer, None, drift=True)
    assert canonical != drifted
    decode = tito.tokenizer.decode
    assert decode(canonical) == decode(drifted)
    assert canonical[-1] == drifted[-1] == tito._special["<|im_end|>"]


def test_stock_template_rewrites_history_so_re_rendering_breaks_the_prefix(tokenizers):
    # What the non-TITO path would see: the backend re-renders the conversation.
    tito = Tito.load(str(tokenizers[("qwen3", "stock")]), "qwen3")
    messages, _, checkpoints = run_conversation(tito, turns=2, drift=False, follow_up="user")
    rerendered = tito.first_turn(messages[:4], TOOLS)
    assert rerendered[: len(checkpoints[0])] != checkpoints[0]


# Renders the last message's role in capitals: appending rewrites what came before.
REWRITING = """{%- for m in messages -%}
{%- if loop.last %}<{{ m.role | upper }}>{% else %}<{{ m.role }}>{% endif %}{{ m.content }}
{%- endfor -%}{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def test_a_render_that_is_not_append_only_is_400_naming_the_message(tokenizers, tmp_path):
    template = tmp_path / "rewriting.jinja"
    template.write_text(REWRITING)
    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "default", str(template))
    checkpoint = tito.first_turn([{"role": "user", "content": "a"}], None)
    last = {"role": "assistant", "content": "b"}
    appended = [{"role": "tool", "content": "c"}, {"role": "user", "content": "d"}]
    with pytest.raises(ApiError) as err:
        tito.next_turn(checkpoint, last, appended, None, first_index=3)
    assert err.value.status == 400
    assert "not append-only at message 3 (role='tool')" in err.value.message


def test_boundary_rules():
    special = {"<|im_end|>": 2, "\n": 10, "<|observation|>": 7, "<|user|>": 8}
    apply = {name: rule.apply for name, rule in RULES.items()}
    assert apply["qwen3"](array("i", [5, 2]), special).tolist() == [5, 2, 10]
    assert apply["qwen3"](array("i", [5, 3]), special).tolist() == [5, 3]
    assert apply["nemotron3"](array("i", [2]), special).tolist() == [2, 10]
    assert apply["glm47"](array("i", [5, 7]), special).tolist() == [5]
    assert apply["glm47"](array("i", [5, 8]), special).tolist() == [5]
    assert apply["glm47"](array("i", [5, 9]), special).tolist() == [5, 9]
    assert apply["default"](array("i", [5, 2]), special).tolist() == [5, 2]
    assert apply["glm47"](array("i"), special).tolist() == []


def test_a_tokenizer_without_the_rules_tokens_is_refused(tokenizers):
    with pytest.raises(ValueError, match="needs '<\\|observation\\|>' to be one token"):
        Tito.load(str(tokenizers[("qwen3", "append_only")]), "glm47")


def test_template_kwargs_reach_the_render(tokenizers):
    tito = Tito.load(str(tokenizers[("qwen3", "stock")]), "qwen3", None, {"enable_thinking": False})
    messages = [{"role": "user", "content": "hi"}]
    off = tito.tokenizer.decode(tito.first_turn(messages, None).tolist())
    on = tito.tokenizer.decode(tito.first_turn(messages, None, {"enable_thinking": True}).tolist())
    assert off != on and "<think>" in off


@pytest.mark.parametrize("key", [("qwen3", "append_only"), ("glm47", "append_only")])
def test_encode_through_the_rust_core_matches_transformers(tokenizers, key):
    # Tito.encode skips transformers' wrapper; the ids must not change.
    tito = Tito.load(str(tokenizers[key]), key[0])
    texts = [
        "plain words, t1 t22 t333 and 4096 digits",
        "<|im_start|>tool\n<think>x</think> <|im_end|>\n<|im_start|>assistant\n",
        "<|observation|><|user|>\n  leading spaces\tand tabs\n\n",
        "",
    ]
    for text in texts:
        expected = tito.tokenizer.encode(text, add_special_tokens=False)
        assert tito.encode(text).tolist() == expected
    assert tito._backend is not None
    assert tito._encode_fast is not None  # the installed tokenizers has the offset-free call


def test_truncation_or_padding_saved_with_a_tokenizer_never_cuts_or_pads_a_prompt(
    tokenizers, tmp_path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers[("qwen3", "append_only")]))
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    tokenizer.save_pretrained(tmp_path)
    tito = Tito.load(str(tmp_path), "default")  # a rule that encodes nothing at load
    text = "plain words, t1 t22 t333 and 4096 digits"
    ids = tito.encode(text).tolist()
    assert 4 < len(ids) < 64
    assert ids == tito.tokenizer.encode(text, add_special_tokens=False)


def _appended_by_two_renders(tito: Tito, last, appended, tools) -> str:
    """The appended text as defined: the render with them minus the render without."""
    dummy: dict[str, Any] = {"role": "assistant", "content": ""}
    if last.get("tool_calls"):
        dummy["tool_calls"] = last["tool_calls"]
    prefix = [{"role": "system", "content": "dummy system"}, dummy]
    base = tito.render(prefix, tools, False, {})
    full = tito.render(prefix + appended, tools, True, {})
    assert full.startswith(base)
    return full[len(base) :]


@pytest.mark.parametrize(("family", "rule"), [("qwen3", "qwen3"), ("glm47", "glm47")])
def test_turns_with_other_tools_or_tool_calls_get_their_own_prefix(tokenizers, family, rule):
    # The prefix render is kept between turns; a turn whose tools or tool calls
    # differ must never be cut by another turn's prefix.
    tito = Tito.load(str(tokenizers[(family, "append_only")]), rule)
    other_tools = [
        {"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}
    ]
    turns = [
        (reply(1, tool=True), TOOLS),
        (reply(2, tool=True), TOOLS),
        (reply(2, tool=True), other_tools),
        (reply(3, tool=False), None),
        (reply(1, tool=True), TOOLS),
        (reply(2, tool=True), None),
    ]
    for last, tools in turns:
        call_id = last["tool_calls"][0]["id"] if last.get("tool_calls") else None
        appended = [{"role": "tool", "tool_call_id": call_id, "content": "r"}]
        if call_id is None:
            appended = [{"role": "user", "content": "next"}]
        got = tito.appended_text(last, appended, tools, {})
        assert got == _appended_by_two_renders(tito, last, appended, tools)


# Writes tool-call ids and a kwarg right after an assistant's content: the prefix
# rendered without them is itself a prefix of the whole render with them.
MARKED = """{%- for m in messages -%}<{{ m.role }}>{{ m.content }}
{%- for c in m.tool_calls or [] %}+{{ c.id }}{% endfor -%}
{%- if m.role == 'assistant' and mark is defined %}{{ mark }}{% endif -%}
{%- endfor -%}{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def test_the_kept_prefix_is_keyed_by_tool_calls_and_kwargs(tokenizers, tmp_path):
    template = tmp_path / "marked.jinja"
    template.write_text(MARKED)
    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "default", str(template))
    plain = {"role": "assistant", "content": "b"}
    user = [{"role": "user", "content": "n"}]
    assert tito.appended_text(plain, user, None, {}) == "<user>n<assistant>"
    calls = reply(1, tool=True)
    tool = [{"role": "tool", "tool_call_id": "c1", "content": "r"}]
    assert tito.appended_text(calls, tool, None, {}) == "<tool>r<assistant>"
    assert tito.appended_text(plain, user, None, {"mark": "|"}) == "<user>n<assistant>"
    assert tito.appended_text(plain, user, None, {}) == "<user>n<assistant>"


def test_a_kept_prefix_that_no_longer_leads_the_render_is_rendered_again(tokenizers):
    # As for a template that writes the date, once the day has changed.
    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "qwen3")
    last = reply(1, tool=True)
    appended = [{"role": "tool", "tool_call_id": "c1", "content": "r"}]
    expected = _appended_by_two_renders(tito, last, appended, TOOLS)
    assert tito.appended_text(last, appended, TOOLS, {}) == expected
    (key,) = tito._prefixes
    tito._prefixes[key] = "<|im_start|>system\nyesterday"
    assert tito.appended_text(last, appended, TOOLS, {}) == expected
    assert expected.startswith("<|im_start|>user") or expected.startswith("\n<|im_start|>user")
    assert tito._prefixes[key] != "<|im_start|>system\nyesterday"


def test_kept_prefix_renders_are_bounded(tokenizers):
    # A client that sends other (large) tools on every turn.
    from rollout_sessions.tito.prompts import PREFIX_CHARS_KEPT

    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "qwen3")
    last = {"role": "assistant", "content": "b"}
    appended = [{"role": "user", "content": "c"}]
    description = "x" * (PREFIX_CHARS_KEPT // 20)
    for k in range(60):
        tools = [{"type": "function", "function": {"name": f"f{k}", "description": description}}]
        assert tito.appended_text(last, appended, tools, {}) == _appended_by_two_renders(
            tito, last, appended, tools
        )
        kept = sum(len(key) + len(text) for key, text in tito._prefixes.items())
        assert kept == tito._prefix_chars <= PREFIX_CHARS_KEPT
    assert 5 <= len(tito._prefixes) < 20
    assert any(b'"f59"' in key for key in tito._prefixes)  # the newest is kept
    huge = [{"type": "function", "function": {"name": "h", "description": "y" * PREFIX_CHARS_KEPT}}]
    assert tito.appended_text(last, appended, huge, {}) == _appended_by_two_renders(
        tito, last, appended, huge
    )
    assert not any(b'"h"' in key for key in tito._prefixes)  # too large to keep


def test_prefixes_kept_from_several_threads_stay_within_the_budget(tokenizers, monkeypatch):
    # tito_check builds prompts in a worker thread while the event loop builds turns.
    import sys
    import threading

    from rollout_sessions.tito import prompts

    monkeypatch.setattr(prompts, "PREFIX_CHARS_KEPT", 3000)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    tito = Tito.load(str(tokenizers[("qwen3", "append_only")]), "qwen3")
    last = {"role": "assistant", "content": "b"}
    appended = [{"role": "user", "content": "c"}]
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for k in range(150):
                tools = [{"type": "function", "function": {"name": f"w{worker}k{k % 7}"}}]
                text = tito.appended_text(last, appended, tools, {})
                assert text == "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
        except BaseException as exc:  # noqa: BLE001  # reported below
            failures.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    kept = sum(len(key) + len(text) for key, text in tito._prefixes.items())
    assert kept == tito._prefix_chars <= 3000
