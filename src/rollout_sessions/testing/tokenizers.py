"""Small, realistic Hugging Face tokenizers built offline, for TITO tests and benchmarks.

Token-in, token-out needs a real ``transformers`` tokenizer: a byte-level BPE, the
family's special tokens as single ids, and a chat template with the family's quirks.
Downloading Qwen3 or GLM from the hub is not an option in tests, so this module trains
a byte-level BPE on a corpus generated in code (deterministically, no data files),
adds the special tokens, attaches a chat template written here and saves the result
with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(directory)`` loads it.

Families and templates:

- ``qwen3``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` turns. ``stock`` behaves like
  Qwen3's own template: an assistant's ``<think>`` block is rendered only for turns after
  the last user message, so history is rewritten once a user message follows.
  ``append_only`` always renders it, so the render only ever grows, with one exception
  kept from Qwen: consecutive tool results share one user turn, so a render that ends
  between two tool messages closes the turn the full render keeps open.
- ``glm47`` (GLM-4.x-like): ``[gMASK]<sop>`` then ``<|role|>`` openers and no closers. The
  model stops on ``<|user|>`` or ``<|observation|>``, which is also the opener the template
  renders for the next message. ``stock`` drops earlier reasoning unless the template kwarg
  ``clear_thinking=False`` is passed (as GLM-4.7 does); ``append_only`` never drops it.
- ``kimi25``, ``kimi26`` (Kimi K2.5/K2.6-like): ``<|im_user|>user<|im_middle|>...<|im_end|>``,
  nothing after the stop token ``<|im_end|>``; the generation prompt ends with ``<think>``.
  ``stock`` renders reasoning only after the last assistant message without tool calls
  (K2.6's unless ``preserve_thinking=True``; K2.5 has no switch).
- ``minimax_m25``, ``minimax_m27`` (MiniMax-M2.5/M2.7-like): ``]~b]{role}\\n...[e~[\\n``; the
  stop token ``[e~[`` is followed by a newline the model does not generate; the generation
  prompt ends with ``<think>\\n``. ``stock`` drops earlier reasoning unless
  ``clear_thinking=False``. The two differ in the default system identity only.
- ``inkling`` (Inkling-like): ``<|message_{role}|>`` blocks closed by ``<|end_message|>``,
  an assistant turn closed by the stop token ``<|content_model_end_sampling|>``. ``stock``
  (the kit's own variant) drops the reasoning of assistants before the last user message.
- ``deepseekv32``, ``deepseekv4``: the DeepSeek special tokens and no jinja template at
  all: those models' template is code (``rollout_sessions.tito.encoders``), whose
  ``drop_thinking`` kwarg plays the part of ``stock`` (the default) and ``append_only``
  (``drop_thinking=False``).

Build one from the command line::

    python -m rollout_sessions.testing.tokenizers DIR --family qwen3 --template append_only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

__all__ = [
    "ENCODER_FAMILIES",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "build_tokenizer",
    "chat_template",
    "main",
    "stop_token",
    "training_corpus",
]

FAMILIES = (
    "qwen3",
    "glm47",
    "kimi25",
    "kimi26",
    "minimax_m25",
    "minimax_m27",
    "deepseekv32",
    "deepseekv4",
    "inkling",
)
# Families whose template is code: their tokenizers carry no jinja template.
ENCODER_FAMILIES = ("deepseekv32", "deepseekv4")
TEMPLATES = ("stock", "append_only")

_KIMI = (
    "[BOS]",
    "[EOS]",
    "[PAD]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<think>",
    "</think>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)
_MINIMAX = (
    "]~!b[",
    "]~b]",
    "[e~[",
    "<think>",
    "</think>",
    "<minimax:tool_call>",
    "</minimax:tool_call>",
)
_DEEPSEEK = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)

SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "qwen3": (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
    ),
    "glm47": (
        "<|endoftext|>",
        "[gMASK]",
        "<sop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ),
    "kimi25": _KIMI,
    "kimi26": _KIMI,
    "minimax_m25": _MINIMAX,
    "minimax_m27": _MINIMAX,
    "deepseekv32": _DEEPSEEK,
    "deepseekv4": (*_DEEPSEEK, "<｜latest_reminder｜>"),
    "inkling": (
        "<|endoftext|>",
        "<|message_user|>",
        "<|message_model|>",
        "<|message_system|>",
        "<|message_tool|>",
        "<|content_text|>",
        "<|content_thinking|>",
        "<|content_invoke_tool_json|>",
        "<|content_xml|>",
        "<|end_message|>",
        "<|content_model_end_sampling|>",
    ),
}

# eos/pad as the real tokenizer configs have them (Qwen3 instruct: eos <|im_end|>).
_EOS_PAD = {
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "glm47": ("<|endoftext|>", "<|endoftext|>"),
    "kimi25": ("[EOS]", "[PAD]"),
    "kimi26": ("[EOS]", "[PAD]"),
    "minimax_m25": ("[e~[", "[e~["),
    "minimax_m27": ("[e~[", "[e~["),
    "deepseekv32": ("<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"),
    "deepseekv4": ("<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"),
    "inkling": ("<|content_model_end_sampling|>", "<|endoftext|>"),
}

# Pre-tokenizer split patterns of the real families: Qwen splits digits one by one,
# GLM-4 (and the others here) in groups of up to three. The split decides which merges
# can exist at all.
_SPLIT_PATTERNS = {
    "qwen3": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "glm47": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
for _family in FAMILIES[2:]:
    _SPLIT_PATTERNS[_family] = _SPLIT_PATTERNS["qwen3" if _family == "inkling" else "glm47"]

_BYTE_ALPHABET = 256
_SEED = 20250107

# -- chat templates ---------------------------------------------------------------------
#
# Every template starts with one line that sets ``keep_all_reasoning``; the rest of the
# source is shared, so "stock" and "append_only" differ in exactly that one condition.
# All literal text goes through {{- ... -}} and every tag trims whitespace, so the
# layout of the jinja source never leaks into the render. Unknown kwargs are ignored
# (jinja treats them as undefined variables nobody reads). The sources are in
# ``templates/``: ``text_macro.jinja`` (shared), then ``qwen3.jinja`` or ``glm47.jinja``.


_KEEP_ALL_REASONING = {
    ("qwen3", "stock"): "false",
    ("qwen3", "append_only"): "true",
    ("glm47", "stock"): "(clear_thinking is defined and clear_thinking is false)",
    ("glm47", "append_only"): "true",
    ("kimi25", "stock"): "false",
    ("kimi25", "append_only"): "true",
    ("kimi26", "stock"): "(preserve_thinking is defined and preserve_thinking)",
    ("kimi26", "append_only"): "true",
    ("minimax_m25", "stock"): "(clear_thinking is defined and clear_thinking is false)",
    ("minimax_m25", "append_only"): "true",
    ("minimax_m27", "stock"): "(clear_thinking is defined and clear_thinking is false)",
    ("minimax_m27", "append_only"): "true",
    ("inkling", "stock"): "false",
    ("inkling", "append_only"): "true",
}
_TEMPLATE_FILES = {
    "qwen3": "qwen3.jinja",
    "glm47": "glm47.jinja",
    "kimi25": "kimi.jinja",
    "kimi26": "kimi.jinja",
    "minimax_m25": "minimax.jinja",
    "minimax_m27": "minimax.jinja",
    "inkling": "inkling.jinja",
}
_TEMPLATE_SETTINGS = {
    "minimax_m25": "{%- set model_name = 'MiniMax-M2.5' -%}",
    "minimax_m27": "{%- set model_name = 'MiniMax-M2.7' -%}",
}


def _check(family: str, template: str | None = None) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def _template_file(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text()


def chat_template(family: str, template: str) -> str:
    """The jinja source of ``family``'s ``template`` (``"stock"`` or ``"append_only"``).

    ``ValueError`` for a family whose template is code (``ENCODER_FAMILIES``).
    """
    _check(family, template)
    if family in ENCODER_FAMILIES:
        raise ValueError(f"{family} has no jinja template: its template is code")
    body = _template_file(_TEMPLATE_FILES[family])
    header = (
        f"{{#- rollout_sessions.testing.tokenizers: {family} {template} -#}}\n"
        f"{{%- set keep_all_reasoning = {_KEEP_ALL_REASONING[family, template]} -%}}"
    )
    if family in _TEMPLATE_SETTINGS:
        header += "\n" + _TEMPLATE_SETTINGS[family]
    return header + "\n" + _template_file("text_macro.jinja") + body.strip() + "\n"


def stop_token(family: str, tool_call: bool = False) -> str:
    """The token the model emits to end its turn.

    qwen3 and kimi end with ``<|im_end|>``, minimax with ``[e~[``, deepseek with
    ``<｜end▁of▁sentence｜>``, inkling with ``<|content_model_end_sampling|>``. glm47 ends
    with the opener of the message it expects next: ``<|observation|>`` after a tool call,
    ``<|user|>`` otherwise.
    """
    _check(family)
    if family == "glm47":
        return "<|observation|>" if tool_call else "<|user|>"
    return _STOP_TOKENS[family]


_STOP_TOKENS = {
    "qwen3": "<|im_end|>",
    "kimi25": "<|im_end|>",
    "kimi26": "<|im_end|>",
    "minimax_m25": "[e~[",
    "minimax_m27": "[e~[",
    "deepseekv32": "<｜end▁of▁sentence｜>",
    "deepseekv4": "<｜end▁of▁sentence｜>",
    "inkling": "<|content_model_end_sampling|>",
}


# -- training corpus --------------------------------------------------------------------

_WORDS = """
the of and to in is that it for was on are as with be at by this have from or one had not
but what all were when we there can an your which their said if do will each about how up
out them then she many some so these would other into has more her two like him see time
could no make than first been its who now people my made over did down only way find use
may water long little very after words called just where most know get through back much
before go good new write our used me man too any day same right look think also around
another came come work three word must because does part even place well such here take
why help put different away again off went old number great tell men say small every found
still between name should home big give air line set own under read last never us left end
along while might next sound below saw something thought both few those always looked show
large often together asked house world going want school important until form food keep
children feet land side without boy once animals life enough took sometimes four head above
kind began almost live page got earth need far hand high year mother light parts country
father let night following picture being study second eyes soon times story boys since white
days ever paper hard near sentence better best across during today others however sure means
knew try told young miles sun ways thing whole hear example heard several change answer room
sea against top turned learn point city play toward five using himself usually money seen
car morning given order red door black become body music color stand questions fish area mark
weather temperature forecast search query result results request response error message file
files directory function value values list table server client session sessions token tokens
model models prompt reply answer tool tools call calls argument arguments return returned
string integer boolean object array null true false status code timeout retry latency memory
rollout reward policy episode step steps agent environment observation action state batch
"""

_NAMES = """
Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Noah Olivia Paul
Paris London Berlin Tokyo Madrid Rome Lisbon Oslo Vienna Prague Dublin Warsaw Cairo Lima
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January March April June October
Python Rust JSON HTTP Linux GitHub
"""

# A little non-ASCII, so some multi-byte sequences get merges of their own.
_UNICODE = "café naïve Zürich São Paulo Kraków 東京 北京 Москва 😀 🚀 — … ✓ °C €".split()

_SYLLABLES = (
    "ka lo mi ter un der ven sol ar ix pro tan bel cor dis fen gra hol jin kor lum mar nor "
    "pel quo ras sim tor ul vak wen yor zel an en in on est ing tion ment able ous ly"
).split()

_TOOL_NAMES = (
    "get_weather",
    "search_web",
    "read_file",
    "write_file",
    "run_python",
    "list_directory",
    "send_email",
    "lookup_stock",
    "convert_units",
    "create_event",
)

_KEYS = ("city", "unit", "days", "query", "path", "limit", "code", "to", "subject", "symbol")


def _pseudo_word(rng: random.Random) -> str:
    # Made-up words give the trainer enough distinct pairs for thousands of merges.
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _number(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return str(rng.randint(0, 100))
    if kind == 1:
        return f"{rng.uniform(-50, 50):.{rng.randint(1, 3)}f}"
    if kind == 2:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == 3:
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return f"{rng.randint(1, 999_999):,}"


def _sentence(rng: random.Random, words: list[str], names: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(5, 16)):
        roll = rng.random()
        if roll < 0.62:
            parts.append(rng.choice(words))
        elif roll < 0.72:
            parts.append(rng.choice(names))
        elif roll < 0.80:
            parts.append(_number(rng))
        elif roll < 0.97:
            parts.append(_pseudo_word(rng))
        else:
            parts.append(rng.choice(_UNICODE))
    parts[0] = parts[0][:1].upper() + parts[0][1:]
    for i in range(1, len(parts) - 1):
        if rng.random() < 0.08:
            parts[i] += rng.choice((",", ";", ":"))
    text = " ".join(parts) + rng.choice((".", ".", ".", "?", "!", "..."))
    if rng.random() < 0.1:
        text = f'"{text}" said {rng.choice(names)}.'
    if rng.random() < 0.08:
        text = f"({text})"
    return text


def _tool_arguments(rng: random.Random, words: list[str], names: list[str]) -> str:
    keys = rng.sample(_KEYS, rng.randint(1, 4))
    args: dict[str, object] = {}
    for key in keys:
        roll = rng.random()
        if roll < 0.4:
            args[key] = rng.choice(names)
        elif roll < 0.6:
            args[key] = rng.randint(0, 1000)
        elif roll < 0.75:
            args[key] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        elif roll < 0.85:
            args[key] = rng.random() < 0.5
        else:
            args[key] = [rng.choice(words) for _ in range(rng.randint(1, 3))]
    call = {"name": rng.choice(_TOOL_NAMES), "arguments": args}
    return json.dumps(call, ensure_ascii=False, indent=2 if rng.random() < 0.3 else None)


def _code_line(rng: random.Random, words: list[str]) -> str:
    name = rng.choice(_TOOL_NAMES)
    a, b = rng.choice(words), rng.choice(words)
    return rng.choice(
        (
            f"def {name}({a}: str, {b}: int = {rng.randint(0, 9)}) -> dict:",
            f"    return {{'{a}': {a}, '{b}': {b}}}",
            f"result = {name}({a}={rng.randint(0, 99)})",
            f"if {a} is None:\n    raise ValueError('{b}')",
            f"for {a} in range({rng.randint(1, 50)}):\n\tprint({a}, end='')",
            f"$ ls -la /home/{a}/{b}.txt && echo $?",
        )
    )


def training_corpus(sentences: int = 400, seed: int = _SEED) -> Iterator[str]:
    """Deterministic English-ish training text, one paragraph per item.

    Prose with names, digits, dates, punctuation and a little unicode; JSON tool calls;
    code lines; markdown lists; single and double newlines.
    """
    rng = random.Random(seed)
    words = _WORDS.split()
    names = _NAMES.split()
    for _ in range(sentences):
        roll = rng.random()
        if roll < 0.65:
            count = rng.randint(1, 3)
            yield " ".join(_sentence(rng, words, names) for _ in range(count))
        elif roll < 0.80:
            yield _tool_arguments(rng, words, names)
        elif roll < 0.90:
            yield _code_line(rng, words)
        else:
            items = [f"- {_sentence(rng, words, names)}" for _ in range(rng.randint(2, 4))]
            yield "## " + rng.choice(words).title() + "\n\n" + "\n".join(items)


# -- building -----------------------------------------------------------------------------


def _train(family: str, merges: int) -> object:
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``merges`` merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # No normalizer: NFC (as Qwen has) would break decode(encode(x)) == x for non-NFC text.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[family]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BYTE_ALPHABET + merges,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus grows with the merge count: two paragraphs per merge leave a margin of
    # pairs (at min_frequency=2) up to about 10000 merges.
    paragraphs = max(400, 2 * merges)
    tokenizer.train_from_iterator(training_corpus(paragraphs), trainer=trainer)
    got = len(json.loads(tokenizer.to_str())["model"]["merges"])
    if got != merges:
        raise ValueError(f"the built-in corpus supports {got} merges, {merges} were asked for")
    return tokenizer


def build_tokenizer(
    directory: str | Path, family: str, template: str = "append_only", merges: int = 400
) -> Path:
    """Build a tokenizer of ``family`` with chat template ``template`` into ``directory``.

    Trains a byte-level BPE with ``merges`` merges on ``training_corpus``, appends the
    family's special tokens (single ids after the BPE vocabulary, as in the real models),
    wraps it in ``transformers.PreTrainedTokenizerFast`` with the chat template and saves
    it with ``save_pretrained``, so ``AutoTokenizer.from_pretrained(directory)`` loads it
    offline. Also writes a ``generation_config.json`` whose ``eos_token_id`` lists the
    family's stop tokens. Returns ``directory`` as a ``Path``.

    The corpus grows with ``merges`` but runs out of pairs somewhere past 10000 merges;
    asking for more raises ``ValueError``. 4000 merges take about a second.
    """
    _check(family, template)
    if merges < 1:
        raise ValueError(f"merges must be positive, got {merges}")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = _train(family, merges)
    specials = SPECIAL_TOKENS[family]
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in specials]
    )
    eos, pad = _EOS_PAD[family]
    template_source = None if family in ENCODER_FAMILIES else chat_template(family, template)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=pad,
        chat_template=template_source,
        clean_up_tokenization_spaces=False,  # it would rewrite " ." to "." on decode
        model_max_length=131072,
    )
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    # transformers 5 writes its own class name, which 4.x cannot load; both map the
    # generic name to their fast tokenizer.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    stops = {stop_token(family), stop_token(family, tool_call=True), eos}
    if "<|endoftext|>" in specials:
        stops.add("<|endoftext|>")
    stops = sorted(stops)
    generation = {
        "eos_token_id": [tokenizer.convert_tokens_to_ids(t) for t in stops],
        "pad_token_id": tokenizer.convert_tokens_to_ids(pad),
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: build one tokenizer and print its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m rollout_sessions.testing.tokenizers",
        description="Build a small Hugging Face tokenizer offline (byte-level BPE + template).",
    )
    parser.add_argument("directory", type=Path, help="where to save_pretrained the tokenizer")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3")
    parser.add_argument("--template", choices=TEMPLATES, default="append_only")
    parser.add_argument("--merges", type=int, default=4000, help="BPE merges (default 4000)")
    args = parser.parse_args(argv)
    try:
        path = build_tokenizer(args.directory, args.family, args.template, args.merges)
    except ValueError as exc:
        parser.error(str(exc))
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
