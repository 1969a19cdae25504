"""Token-in, token-out for every model family, in process, with tokenizers built offline in
each family's shape (testing/tokenizers.py): Qwen3, GLM-4.7, Kimi K2.5/K2.6, MiniMax-M2.5/M2.7,
DeepSeek-V3.2/V4 (templates written as code) and Inkling.

The claims, for every family:

- with an append-only template, the ids sent at every turn of a conversation with tools and
  reasoning equal the tokenized whole render of that conversation, whether the model stopped
  right at its stop token or also generated the text its template writes after it;
- with the family's stock template, every turn still extends the previous checkpoint;
- ``TITO_MODEL=auto`` finds the family from the name, the special tokens or the template, and
  warns for an unknown one;
- the start-up report says whether the template is append-only, naming the first differing
  message when it is not;
- the DeepSeek encoders render as the published encoders do.
"""

from __future__ import annotations

import json
import logging
import shutil
from array import array
from pathlib import Path
from typing import Any

import pytest

from rollout_sessions.echo.tokenized import TokenizedTemplate
from rollout_sessions.testing.tokenizers import FAMILIES, build_tokenizer
from rollout_sessions.tito import RULES, Tito, detect
from rollout_sessions.tito.check import append_only_report, diff, log_append_only_report
from rollout_sessions.tito.encoders import ENCODERS
from rollout_sessions.web.errors import ApiError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a thing up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
# The kwargs that make a family's template append-only (its "append_only" tokenizer for the
# others); DeepSeek's template is code, switched by drop_thinking.
APPEND_ONLY_KWARGS = {
    "deepseekv32": {"drop_thinking": False},
    "deepseekv4": {"drop_thinking": False},
}
# Families whose template writes text after the stop token (a newline).
TRAILING = ("qwen3", "minimax_m25", "minimax_m27")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        (family, template): build_tokenizer(root / f"{family}-{template}", family, template)
        for family in FAMILIES
        for template in ("stock", "append_only")
    }


def load(kit: dict, family: str, template: str = "append_only", rule: str | None = None) -> Tito:
    kwargs = APPEND_ONLY_KWARGS.get(family, {}) if template == "append_only" else {}
    return Tito.load(str(kit[family, template]), rule or family, None, kwargs)


def reply(turn: int, calls: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "" if calls else f"The answer is {turn * 7}.",
        "reasoning_content": f"Step {turn}: think about it.",
    }
    if calls:
        message["tool_calls"] = [
            {
                "id": f"c{turn}_{k}",
                "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"query": f"q{turn}{k}"})},
            }
            for k in range(calls)
        ]
    return message


# Per turn: how many tool calls the model makes (0: it answers and a user follows).
PLAN = (1, 2, 0, 1, 0)


def converse(
    tito: Tito, drift: bool = False, trailing: bool = False
) -> tuple[list[dict[str, Any]], list[array], list[array], list[int]]:
    """Turn by turn as the chat route does it: (messages, prompts, checkpoints, and the
    number of messages each prompt was built from)."""
    model = TokenizedTemplate(tito)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Find things, then answer."},
    ]
    prompts: list[array] = []
    checkpoints: list[array] = []
    sizes: list[int] = []
    last = -1
    for turn, calls in enumerate(PLAN):
        if not checkpoints:
            prompt = tito.first_turn(messages, TOOLS)
        else:
            prompt = tito.next_turn(
                checkpoints[-1], messages[last], messages[last + 1 :], TOOLS, None, last + 1
            )
        answer = reply(turn, calls)
        completion = model.completion_ids(messages, answer, TOOLS, drift, trailing)
        prompts.append(prompt)
        sizes.append(len(messages))
        checkpoints.append(prompt + array("i", completion))
        last = len(messages)
        messages = [*messages, answer]
        # Results in the reverse order of the calls (DeepSeek-V4 sorts them back).
        for call in reversed(answer.get("tool_calls") or []):
            result = f"result of {call['id']}"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if not calls:
            messages.append({"role": "user", "content": f"And then {turn}?"})
    return messages, prompts, checkpoints, sizes


def whole(tito: Tito, messages: list[dict[str, Any]], generation_prompt: bool = True) -> array:
    return tito.encode(tito.render(messages, TOOLS, generation_prompt, tito.template_kwargs))


# -- the ids sent equal a whole render ----------------------------------------------------


@pytest.mark.parametrize(
    ("family", "trailing"),
    [(f, False) for f in FAMILIES] + [(f, True) for f in TRAILING],
)
def test_every_prompt_equals_the_whole_render(kit, family: str, trailing: bool) -> None:
    tito = load(kit, family)
    messages, prompts, checkpoints, sizes = converse(tito, trailing=trailing)
    for prompt, size in zip(prompts, sizes, strict=True):
        assert prompt.tolist() == whole(tito, messages[:size]).tolist(), size
    # The stored ids, as the next turn continues them, are the render of the conversation.
    end = sizes[-1] + 1
    assert tito.apply_boundary(checkpoints[-1]) == whole(tito, messages[:end], False)
    stop = RULES[family].tokens[0]
    stop_id = tito.encode(stop).tolist()
    assert len(stop_id) == 1
    if family in TRAILING:
        newline = tito.encode("\n")[0]
        for checkpoint, next_prompt in zip(checkpoints, prompts[1:], strict=False):
            # The model stopped at its stop token (or also wrote the newline after it);
            # the next prompt continues the checkpoint with the template's newline once.
            assert checkpoint[-1] == (newline if trailing else stop_id[0])
            n = len(checkpoint)
            assert next_prompt[:n] == checkpoint
            assert next_prompt[n - 1 : n + 1].tolist() == [stop_id[0], newline][trailing:] + (
                [next_prompt[n]] if trailing else []
            )
    elif family != "glm47":
        for checkpoint, next_prompt in zip(checkpoints, prompts[1:], strict=False):
            assert checkpoint[-1] == stop_id[0]  # nothing follows it: plain concatenation
            assert next_prompt[: len(checkpoint)] == checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_a_non_canonical_tokenization_is_kept_and_decodes_to_the_whole_render(
    kit, family: str
) -> None:
    tito = load(kit, family)
    messages, prompts, checkpoints, sizes = converse(tito, drift=True)
    for k, (prompt, size) in enumerate(zip(prompts, sizes, strict=True)):
        text = tito.render(messages[:size], TOOLS, True, tito.template_kwargs)
        assert tito.tokenizer.decode(prompt.tolist()) == text
        if k:
            base = tito.apply_boundary(checkpoints[k - 1])
            assert prompt[: len(base)] == base
    assert prompts[-1].tolist() != whole(tito, messages[: sizes[-1]]).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_templates_still_extend_every_checkpoint(kit, family: str) -> None:
    tito = load(kit, family, "stock")
    messages, prompts, checkpoints, sizes = converse(tito, drift=True)
    for k in range(1, len(prompts)):
        base = tito.apply_boundary(checkpoints[k - 1])
        assert prompts[k][: len(base)] == base


# -- boundary rules -----------------------------------------------------------------------


def test_boundary_rules_of_the_new_families() -> None:
    special = {
        "<|im_end|>": 2,
        "\n": 10,
        "[e~[": 3,
        "<｜end▁of▁sentence｜>": 4,
        "<|content_model_end_sampling|>": 5,
    }

    def apply(name: str, ids: list[int]) -> list[int]:
        return RULES[name].apply(array("i", ids), special).tolist()

    for name in ("minimax_m25", "minimax_m27"):
        assert apply(name, [9, 3]) == [9, 3, 10]  # stopped at [e~[: the newline follows
        assert apply(name, [9, 3, 10]) == [9, 3, 10]  # generated the newline too
        assert apply(name, [9, 8]) == [9, 8]  # stopped elsewhere (length)
    for name in ("kimi25", "kimi26"):
        assert apply(name, [9, 2]) == [9, 2]
    for name in ("deepseekv32", "deepseekv4"):
        assert apply(name, [9, 4]) == [9, 4]
    assert apply("inkling", [9, 5]) == [9, 5]
    for name in ("qwen35", "nemotron3", "qwennext"):
        assert apply(name, [9, 2]) == [9, 2, 10]
    assert {RULES[n].max_trim_tokens for n in RULES if not n.startswith("glm")} == {0}


@pytest.mark.parametrize("family", ["qwen3", "minimax_m25", "glm47", "kimi25"])
def test_the_bound_boundary_is_the_rule(kit, family: str) -> None:
    tito = load(kit, family)
    for token in (*tito.rule.tokens, "x"):
        for ids in ([], [7], [7, *tito.encode(token).tolist()], [7, 8, *tito.encode(token)]):
            ids_array = array("i", ids)
            expected = tito.rule.apply(ids_array, tito._special).tolist()
            assert tito.apply_boundary(ids_array).tolist() == expected


def test_aliases_name_their_families() -> None:
    assert RULES["qwennext"] is RULES["qwen3"]
    assert RULES["glm45"] is RULES["glm5"] is RULES["glm47"]
    # Same boundary as Qwen3, but their templates iterate tool-call arguments as objects.
    assert RULES["qwen35"].closer == RULES["nemotron3"].closer == RULES["qwen3"].closer
    assert RULES["qwen35"].object_arguments and RULES["nemotron3"].object_arguments
    assert not RULES["qwen3"].object_arguments
    assert RULES["glm47"].object_arguments


@pytest.mark.parametrize("family", ["minimax_m25", "inkling", "glm47"])
def test_string_arguments_render_as_objects_where_the_template_needs_them(kit, family: str) -> None:
    tito = load(kit, family)
    as_string = reply(0, 1)
    as_object = json.loads(json.dumps(as_string))
    function = as_object["tool_calls"][0]["function"]
    function["arguments"] = json.loads(function["arguments"])
    history = [{"role": "user", "content": "hi"}]
    text = tito.render([*history, as_string], TOOLS, False, {})
    assert text == tito.render([*history, as_object], TOOLS, False, {})
    assert '"query": "q00"' not in text  # not the JSON text as it came


def test_an_encoder_family_refuses_a_chat_template(kit, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    with pytest.raises(ValueError, match="CHAT_TEMPLATE does not apply"):
        Tito.load(str(kit["deepseekv32", "stock"]), "deepseekv32", str(template))


def test_a_rule_whose_tokens_the_tokenizer_lacks_is_refused(kit) -> None:
    with pytest.raises(ValueError, match=r"needs '\[e~\[' to be one token"):
        Tito.load(str(kit["kimi25", "stock"]), "minimax_m25")


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_detects_the_family_from_the_tokenizer_name(kit, family: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="rollout_sessions")
    tito = Tito.load(str(kit[family, "stock"]), "auto")
    assert tito.rule is RULES[family]
    assert f"TITO_MODEL=auto chose {family}: tokenizer name" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_detects_the_family_from_special_tokens(kit, family: str, tmp_path: Path) -> None:
    # A directory name that says nothing: the special tokens (and, between versions that
    # share them, the template) decide.
    anonymous = shutil.copytree(kit[family, "stock"], tmp_path / "checkpoint")
    from transformers import AutoTokenizer

    rule, why = detect(AutoTokenizer.from_pretrained(anonymous), str(anonymous))
    assert rule == family
    assert "special tokens" in why


def test_auto_reads_the_checkpoint_model_type(kit, tmp_path: Path) -> None:
    anonymous = shutil.copytree(kit["deepseekv4", "stock"], tmp_path / "ckpt")
    (anonymous / "config.json").write_text('{"model_type": "deepseek_v4"}')
    from transformers import AutoTokenizer

    rule, why = detect(AutoTokenizer.from_pretrained(anonymous), str(anonymous))
    assert (rule, why) == ("deepseekv4", "config.json model_type 'deepseek_v4' matches deepseekv4")


def test_a_name_whose_family_tokens_are_missing_falls_back_to_the_tokens(
    kit, tmp_path: Path
) -> None:
    misnamed = shutil.copytree(kit["glm47", "stock"], tmp_path / "Qwen3-8B")
    from transformers import AutoTokenizer

    rule, why = detect(AutoTokenizer.from_pretrained(misnamed), str(misnamed))
    assert rule == "glm47" and "special tokens" in why


def test_an_unknown_family_warns_and_uses_the_default_rule(tmp_path: Path, caplog) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        chat_template="{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}",
    )
    tokenizer.save_pretrained(tmp_path / "mystery-model")
    caplog.set_level(logging.INFO, logger="rollout_sessions")
    tito = Tito.load(str(tmp_path / "mystery-model"), "auto")
    assert tito.rule is RULES["default"]
    (record,) = [r for r in caplog.records if "TITO_MODEL=auto" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "of no known model family" in record.getMessage()
    assert "using the default boundary rule" in record.getMessage()


# -- the start-up report --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_report_finds_append_only_templates_append_only(kit, family: str) -> None:
    ok, message = append_only_report(load(kit, family))
    assert ok, message
    assert "renders append-only" in message


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseekv4"])
def test_the_report_names_the_first_message_a_stock_template_renders_differently(
    kit, family: str, caplog
) -> None:
    # Every stock template here drops (or empties) the reasoning of the first assistant
    # message, message 2, once a later user message (or, for Kimi, answer) arrives.
    tito = load(kit, family, "stock")
    ok, message = append_only_report(tito)
    assert not ok
    assert "first differs from TITO's turn-by-turn prompts at message 2 (assistant)" in message
    assert "keep what the model generated" in message
    caplog.set_level(logging.INFO, logger="rollout_sessions")
    log_append_only_report(tito)
    (record,) = [r for r in caplog.records if "not append-only" in r.getMessage()]
    assert record.levelno == logging.WARNING


def test_deepseek_v4_keeps_reasoning_when_tools_are_declared(kit) -> None:
    # Its published encoder never drops reasoning in a conversation with tools, which is
    # the report's conversation; without tools the stock render drops it.
    tito = load(kit, "deepseekv4", "stock")
    assert append_only_report(tito)[0]
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r"},
        {"role": "user", "content": "c"},
    ]
    assert "r</think>" in tito.render(history, TOOLS, False, {})
    assert "r</think>" not in tito.render(history, None, False, {})


def test_the_report_of_a_template_that_rewrites_appended_messages(kit, tmp_path: Path) -> None:
    template = tmp_path / "rewriting.jinja"
    template.write_text(
        "{%- for m in messages -%}{%- if loop.last %}<{{ m.role | upper }}>{% else %}"
        "<{{ m.role }}>{% endif %}{{ m.content }}{%- endfor -%}"
        "{%- if add_generation_prompt %}<assistant>{% endif -%}"
    )
    tito = Tito.load(str(kit["qwen3", "append_only"]), "default", str(template))
    ok, message = append_only_report(tito)
    assert not ok
    assert "not append-only at message 3 (role='tool')" in message
    assert "refused (400)" in message


# -- the DeepSeek encoders ------------------------------------------------------------------


def golden_cases() -> list[dict[str, Any]]:
    return json.loads((DATA / "deepseek_encoders.json").read_text())["cases"]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: f"{c['family']}")
def test_the_encoders_render_as_the_published_ones(case: dict[str, Any]) -> None:
    encoder = ENCODERS[case["family"]]
    got = encoder.render(case["messages"], case["tools"], True, case["kwargs"])
    assert got == case["expected"]


def test_encoder_ids_are_the_tokenized_render(kit) -> None:
    for case in golden_cases()[:12]:
        tito = Tito.load(str(kit[case["family"], "stock"]), case["family"])
        ids = tito.first_turn(case["messages"], case["tools"], case["kwargs"])
        assert ids.tolist() == tito.encode(case["expected"]).tolist()
        assert tito.tokenizer.decode(ids.tolist()) == case["expected"]


def test_encoder_generation_prompt_and_errors() -> None:
    v32, v4 = ENCODERS["deepseekv32"], ENCODERS["deepseekv4"]
    user = [{"role": "user", "content": "hi"}]
    bos = "<｜begin▁of▁sentence｜>"
    assert v32.render(user, None, True, {}) == bos + "<｜User｜>hi<｜Assistant｜><think>"
    assert v32.render(user, None, False, {}) == bos + "<｜User｜>hi"
    chat = v4.render(user, None, True, {"thinking_mode": "chat"})
    assert chat.endswith("<｜Assistant｜></think>")
    assert v4.render(user, None, True, {"enable_thinking": False}).endswith("</think>")
    with pytest.raises(ValueError, match="thinking_mode"):
        v32.render(user, None, True, {"thinking_mode": "deep"})
    with pytest.raises(ValueError, match="without its tool call"):
        v32.render([*user, {"role": "tool", "content": "x"}], None, True, {})


def test_an_encoder_error_is_a_400(kit) -> None:
    tito = Tito.load(str(kit["deepseekv32", "stock"]), "deepseekv32")
    with pytest.raises(ApiError) as err:
        tito.first_turn([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], None)
    assert err.value.status == 400


# -- the tito_check diff --------------------------------------------------------------------


def test_diff_finds_each_differing_region_with_its_text(kit) -> None:
    tito = load(kit, "qwen3")
    text = "<|im_start|>user\nThe weather in Paris is clear today.<|im_end|>\n"
    fresh = tito.encode(text)
    assert diff(tito, fresh, fresh) == []
    changed = tito.encode(text.replace("clear", "grey").replace("Paris", "Oslo"))
    regions = diff(tito, changed, fresh)
    assert len(regions) == 2
    assert all(not r["same_text"] for r in regions)
    assert "Oslo" in regions[0]["stored_text"] and "Paris" in regions[0]["rendered_text"]
    assert "grey" in regions[1]["stored_text"] and "clear" in regions[1]["rendered_text"]
    assert regions[0]["position"] < regions[1]["position"]
    # The same text in other ids (a model's own tokenization): same_text.
    spelled = array("i", [i for ch in "The weather" for i in tito.encode(ch)])
    (region,) = diff(tito, spelled, tito.encode("The weather"))
    assert region["same_text"]
    # A longer stored sequence: the extra tail is a region too.
    (tail,) = diff(tito, fresh + tito.encode("extra"), fresh)
    assert tail["position"] == len(fresh) and tail["rendered_count"] == 0


def test_tito_model_defaults_to_auto_and_names_every_family() -> None:
    from rollout_sessions.config import SettingsError, load_settings

    assert load_settings(environ={}).tito_model == "auto"
    for name in ("kimi25", "kimi26", "minimax_m25", "minimax_m27", "deepseekv32", "inkling"):
        settings = load_settings(environ={"ROLLOUT_SESSIONS_TITO_MODEL": name.upper()})
        assert settings.tito_model == name
    with pytest.raises(SettingsError, match="must be one of auto, default, qwen3") as err:
        load_settings(environ={"ROLLOUT_SESSIONS_TITO_MODEL": "llama"})
    assert "TITO_MODEL" in str(err.value)


# -- the compiled template equals transformers' render ----------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("deepseek")])
@pytest.mark.parametrize("template", ["stock", "append_only"])
def test_the_compiled_template_renders_as_apply_chat_template(kit, family, template) -> None:
    tito = load(kit, family, template)
    assert tito._fast_render is not None
    messages, _, _, _ = converse(tito, drift=True)
    variants = [
        messages,
        [*messages[:2], {"role": "assistant", "content": None, "reasoning": "old name"}],
        [*messages[:2], {"role": "assistant", "content": "x", "thinking": "other name"}],
    ]
    for conversation in variants:
        for k in range(1, len(conversation) + 1):
            for tools in (TOOLS, None, []):
                for generation_prompt in (False, True):
                    for kwargs in ({}, {"enable_thinking": False, "preserve_thinking": True}):
                        prepared = conversation[:k]
                        if tito.rule.object_arguments:
                            from rollout_sessions.tito.prompts import _with_object_arguments

                            prepared = _with_object_arguments(prepared)
                        expected = tito.tokenizer.apply_chat_template(
                            prepared,
                            tools=tools or None,
                            add_generation_prompt=generation_prompt,
                            tokenize=False,
                            **kwargs,
                        )
                        got = tito.render(conversation[:k], tools, generation_prompt, kwargs)
                        assert got == expected, (k, tools, generation_prompt, kwargs)


def test_generation_tags_and_fallback_to_apply_chat_template(kit, tmp_path: Path) -> None:
    tagged = tmp_path / "tagged.jinja"
    tagged.write_text(
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tito = Tito.load(str(kit["qwen3", "append_only"]), "qwen3", str(tagged))
    assert tito._fast_render is not None
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tito.render(messages, None, True, {}) == "<user>a<assistant>b<assistant>"
    # A template whose render needs transformers' own environment (its namespace refuses
    # underscore names; jinja's does not): the probe differs, apply_chat_template renders.
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ dict.__name__ if dict.__name__ is defined else 'sandboxed' }}"
    )
    tito = Tito.load(str(kit["qwen3", "append_only"]), "qwen3", str(strict))
    assert tito._fast_render is None
    assert tito.render(messages, None, False, {}) == tito.tokenizer.apply_chat_template(
        messages, tokenize=False
    )
