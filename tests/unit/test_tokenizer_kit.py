"""The offline tokenizer kit: byte-level BPE, special tokens, and the chat templates' quirks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from rollout_sessions.testing.tokenizers import (
    ENCODER_FAMILIES,
    FAMILIES,
    SPECIAL_TOKENS,
    TEMPLATES,
    build_tokenizer,
    chat_template,
    main,
    stop_token,
)
from rollout_sessions.tito.check import REPORT_TOOLS

MERGES = 400
COMBOS = [(family, template) for family in FAMILIES for template in TEMPLATES]
# The first two families; the others have tests of their own (test_tito_families.py).
QWEN_GLM = ("qwen3", "glm47")

TOOLS = REPORT_TOOLS

# system, user, assistant (reasoning + tool call), tool, assistant (reasoning + answer), user
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the weather tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
    {
        "role": "assistant",
        "content": "It is 21 °C and clear in Paris.",
        "reasoning_content": "The tool says 21 degrees.",
    },
    {"role": "user", "content": "Thanks! And tomorrow?"},
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """One loaded tokenizer per (family, template), built once for the module."""
    root = tmp_path_factory.mktemp("tokenizers")
    loaded = {}
    for family, template in COMBOS:
        path = build_tokenizer(root / f"{family}-{template}", family, template, merges=MERGES)
        loaded[family, template] = AutoTokenizer.from_pretrained(path)
    return loaded


def render(tok: Any, messages: list[dict[str, Any]], gen: bool = False, **kwargs: Any) -> str:
    return tok.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=gen, tokenize=False, **kwargs
    )


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# -- building and loading ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_build_saves_what_autotokenizer_loads(tmp_path: Path, family: str) -> None:
    path = build_tokenizer(tmp_path / "tok", family, merges=MERGES)
    assert path == tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if family in ENCODER_FAMILIES:
        assert not tok.chat_template  # its template is code
    else:
        assert tok.chat_template == chat_template(family, "append_only")
    # 256 byte symbols + one token per merge, then the special tokens after them.
    assert len(tok) == 256 + MERGES + len(SPECIAL_TOKENS[family])
    merges = json.loads((path / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == MERGES
    assert tok.eos_token in SPECIAL_TOKENS[family]
    assert tok.pad_token in SPECIAL_TOKENS[family]
    generation = json.loads((path / "generation_config.json").read_text())
    eos = set(tok.convert_ids_to_tokens(generation["eos_token_id"]))
    assert {stop_token(family), stop_token(family, tool_call=True)} <= eos


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tokenizer(tmp_path / "a", "glm47", merges=MERGES)
    b = build_tokenizer(tmp_path / "b", "glm47", merges=MERGES)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_cli_builds_a_real_sized_tokenizer_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    argv = [str(tmp_path / "big"), "--family", "qwen3", "--template", "stock", "--merges", "4000"]
    assert main(argv) == 0
    assert time.perf_counter() - start < 30
    assert Path(capsys.readouterr().out.strip()) == (tmp_path / "big").resolve()
    tok = AutoTokenizer.from_pretrained(tmp_path / "big")
    assert len(tok) == 256 + 4000 + len(SPECIAL_TOKENS["qwen3"])
    assert tok.chat_template == chat_template("qwen3", "stock")


def test_unknown_names_and_impossible_merge_counts_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        chat_template("llama", "stock")
    with pytest.raises(ValueError, match="template"):
        build_tokenizer(tmp_path, "qwen3", "fixed")
    with pytest.raises(ValueError, match="family"):
        stop_token("llama")
    with pytest.raises(ValueError, match="merges"):
        build_tokenizer(tmp_path, "qwen3", merges=0)


# -- tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_ids_after_the_bpe_vocabulary(
    kit: dict[tuple[str, str], Any], family: str
) -> None:
    tok = kit[family, "append_only"]
    ids = []
    for token in SPECIAL_TOKENS[family]:
        encoded = encode(tok, token)
        assert len(encoded) == 1, token
        assert encoded[0] >= 256 + MERGES
        assert tok.convert_ids_to_tokens(encoded[0]) == token
        ids.append(encoded[0])
    assert len(set(ids)) == len(ids)
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert special == set(SPECIAL_TOKENS[family])
    # Inside text, too, and never merged with its neighbours.
    token = SPECIAL_TOKENS[family][-1]
    assert encode(tok, f"ab{token}cd").count(encode(tok, token)[0]) == 1
    # The qwen3 boundary rule needs "\n" alone to be one token.
    assert len(encode(tok, "\n")) == 1


TRICKY = (
    "Héllo, wörld!  Two  spaces, a tab\there, CRLF\r\nand LF\n\n"
    "e\u0301 (not NFC) · 東京 · Москва · 😀👩‍💻 · \x00\x7f · ' ☃ '\n"
    '{"city": "São Paulo", "days": [1, 2, 3.5e-3], "ok": true}\n'
    "    indented()   trailing   \n\t\n  <|im_end|> <think> [gMASK] <|user|>"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_byte_level_bpe_round_trips_arbitrary_text(
    kit: dict[tuple[str, str], Any], family: str
) -> None:
    tok = kit[family, "append_only"]
    for text in (TRICKY, "", " ", "\n", "x" * 1000, "🎉" * 7):
        ids = encode(tok, text)
        assert tok.decode(ids) == text
    # And the merges do something, even only 400 of them: well under a token per byte.
    english = "The weather in Paris is clear today, and the temperature is 21 degrees."
    assert len(encode(tok, english)) < 0.7 * len(english.encode())


# -- templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "template", "kwargs"),
    [
        ("qwen3", "append_only", {}),
        ("glm47", "append_only", {}),
        ("glm47", "append_only", {"clear_thinking": True}),
        ("glm47", "stock", {"clear_thinking": False}),
    ],
)
def test_append_only_templates_render_prefixes(
    kit: dict[tuple[str, str], Any], family: str, template: str, kwargs: dict[str, Any]
) -> None:
    tok = kit[family, template]
    full = render(tok, CONVERSATION, **kwargs)
    for k in range(1, len(CONVERSATION)):
        assert full.startswith(render(tok, CONVERSATION[:k], **kwargs)), k
        assert encode(tok, full)[: len(encode(tok, render(tok, CONVERSATION[:k], **kwargs)))] == (
            encode(tok, render(tok, CONVERSATION[:k], **kwargs))
        )
    # Every reasoning block survives the later user message.
    for message in CONVERSATION:
        if message.get("reasoning_content"):
            assert message["reasoning_content"] in full


@pytest.mark.parametrize(
    ("family", "dropped"),
    [("qwen3", "<think>\nThe tool says 21 degrees.\n</think>"), ("glm47", "<think>The tool")],
)
def test_stock_templates_rewrite_history_once_a_user_message_follows(
    kit: dict[tuple[str, str], Any], family: str, dropped: str
) -> None:
    tok = kit[family, "stock"]
    before = render(tok, CONVERSATION[:5])
    after = render(tok, CONVERSATION)
    assert dropped in before
    assert dropped not in after
    assert not after.startswith(before)
    # Before any later user message the stock render still grows by appending.
    assert render(tok, CONVERSATION[:5]).startswith(render(tok, CONVERSATION[:3]))


def test_qwen3_groups_consecutive_tool_results_into_one_user_turn(
    kit: dict[tuple[str, str], Any],
) -> None:
    tok = kit["qwen3", "append_only"]
    call = CONVERSATION[2]["tool_calls"][0]
    messages = CONVERSATION[:2] + [
        {**CONVERSATION[2], "tool_calls": [call, {**call, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "A"},
        {"role": "tool", "tool_call_id": "call_2", "content": "B"},
    ]
    text = render(tok, messages)
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nA\n</tool_response>\n"
        "<tool_response>\nB\n</tool_response><|im_end|>\n"
    )
    # The one place where even append_only is not a prefix, as in Qwen's own template.
    assert not text.startswith(render(tok, messages[:4]))


@pytest.mark.parametrize(("family", "template"), [c for c in COMBOS if c[0] in QWEN_GLM])
def test_generation_prompt_is_the_documented_text(
    kit: dict[tuple[str, str], Any], family: str, template: str
) -> None:
    tok = kit[family, template]
    base = render(tok, CONVERSATION)
    prompt = render(tok, CONVERSATION, gen=True, some_unknown_kwarg=[1, 2])
    if family == "qwen3":
        assert prompt == base + "<|im_start|>assistant\n"
        no_think = render(tok, CONVERSATION, gen=True, enable_thinking=False)
        assert no_think == base + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    else:
        assert prompt == base + "<|assistant|>"
        assert base.startswith("[gMASK]<sop><|system|>\n# Tools")
        assert base.count("[gMASK]<sop>") == 1


def test_tool_call_arguments_render_as_object_or_string(
    kit: dict[tuple[str, str], Any],
) -> None:
    as_object = CONVERSATION[:3]
    arguments = json.dumps(CONVERSATION[2]["tool_calls"][0]["function"]["arguments"])
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    as_string = CONVERSATION[:2] + [{**CONVERSATION[2], "tool_calls": [call]}]
    qwen = kit["qwen3", "append_only"]
    expected = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n'
    assert expected in render(qwen, as_object)
    assert render(qwen, as_string) == render(qwen, as_object)
    glm = kit["glm47", "append_only"]
    assert render(glm, as_object).endswith(
        "<|assistant|><think>I should call the weather tool.</think>\n<tool_call>get_weather"
        "<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>1</arg_value></tool_call>"
    )
    assert render(glm, as_string).endswith(f"<tool_call>get_weather{arguments}</tool_call>")


def test_stop_tokens() -> None:
    assert stop_token("qwen3") == "<|im_end|>"
    assert stop_token("qwen3", tool_call=True) == "<|im_end|>"
    assert stop_token("glm47") == "<|user|>"
    assert stop_token("glm47", tool_call=True) == "<|observation|>"


@pytest.mark.parametrize("family", QWEN_GLM)
@pytest.mark.parametrize("turn", [2, 4])  # the tool-calling turn, the answering turn
def test_stop_token_meets_what_the_template_renders_next(
    kit: dict[tuple[str, str], Any], family: str, turn: int
) -> None:
    """Prompt ids + completion ids + stop id line up with the ids of the next render.

    qwen3: the template writes "\\n" after the stop token. glm47: the stop token is the
    next message's opener, so it is the same id the full render has at that point.
    """
    tok = kit[family, "append_only"]
    prompt = encode(tok, render(tok, CONVERSATION[:turn], gen=True))
    with_answer = render(tok, CONVERSATION[: turn + 1])
    completion = with_answer[len(render(tok, CONVERSATION[:turn], gen=True)) :]
    assert with_answer.startswith(render(tok, CONVERSATION[:turn], gen=True))
    tool_call = bool(CONVERSATION[turn].get("tool_calls"))
    stop = encode(tok, stop_token(family, tool_call))
    nxt = encode(tok, render(tok, CONVERSATION[: turn + 2]))
    if family == "qwen3":
        assert completion.endswith("<|im_end|>\n")
        generated = encode(tok, completion.removesuffix("<|im_end|>\n")) + stop
        assert nxt[: len(prompt) + len(generated) + 1] == prompt + generated + encode(tok, "\n")
    else:
        generated = encode(tok, completion) + stop
        assert nxt[: len(prompt) + len(generated)] == prompt + generated
