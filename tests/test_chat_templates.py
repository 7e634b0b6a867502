"""Chat templates: built-in formats, the model's own template, and hostile templates."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import jinja2
import pytest

from chatcli import jinja_sandbox
from chatcli.chat_templates import BUILTIN_NAMES, ChatFormat, builtin_format, choose_format, render_template
from chatcli.errors import TemplateError
from chatcli.gguf_info import read_gguf

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]

# Each family's official format, written out by hand.
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] Name a colour. [/INST]"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "phi3": (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nName a colour.<|end|>\n<|assistant|>\n"
    ),
    "mistral": "<s>[INST] You are terse.\n\nHi [/INST]Hello!</s>[INST] Name a colour. [/INST]",
    "alpaca": (
        "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    ),
    "plain": "You are terse.\n\nUser: Hi\nAssistant: Hello!\nUser: Name a colour.\nAssistant:",
}
EXPECTED_STOP = {
    "chatml": ("<|im_end|>",),
    "llama2": ("</s>",),
    "llama3": ("<|eot_id|>",),
    "gemma": ("<end_of_turn>",),
    "phi3": ("<|end|>", "<|endoftext|>"),
    "mistral": ("</s>",),
    "alpaca": ("### Instruction:",),
    "plain": ("\nUser:",),
}

# SmolLM2-135M-Instruct's tokenizer.chat_template, as shipped in its tokenizer_config.json and GGUF.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__ }}",
    "{% set x = messages.append(1) %}",
    "{{ messages.pop() }}",
    "{{ self._TemplateReference__context }}",
]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_renders_the_official_format(name: str) -> None:
    chat_format = builtin_format(name)
    assert chat_format.render(CONVERSATION) == EXPECTED[name]
    assert chat_format.stop == EXPECTED_STOP[name]


def test_every_required_builtin_exists() -> None:
    assert set(BUILTIN_NAMES) >= {"chatml", "llama2", "llama3", "gemma", "phi3", "mistral", "alpaca", "plain"}


def test_builtin_uses_the_models_tokens_and_adds_eos_to_stop() -> None:
    chat_format = builtin_format("llama2", bos_token="<BOS>", eos_token="<EOS>")
    expected = "<BOS>[INST] Hi [/INST] Hello! <EOS><BOS>[INST] Name a colour. [/INST]"
    assert chat_format.render(CONVERSATION[1:]) == expected
    assert chat_format.stop == ("</s>", "<EOS>")


def test_generation_prompt_can_be_left_off() -> None:
    text = builtin_format("chatml").render(CONVERSATION[:3], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


@pytest.mark.parametrize(
    ("name", "renders_bos"), [("llama3", True), ("gemma", True), ("chatml", False), ("phi3", False)]
)
def test_renders_bos_says_whether_the_text_starts_with_bos(name: str, renders_bos: bool) -> None:
    assert builtin_format(name).renders_bos() is renders_bos


def test_renders_bos_is_false_without_a_bos_text() -> None:
    assert not ChatFormat("gguf", "{{ bos_token }}{{ messages[0]['content'] }}").renders_bos()


def test_unknown_builtin_lists_the_valid_names() -> None:
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'") as caught:
        builtin_format("vicuna")
    assert all(name in str(caught.value) for name in BUILTIN_NAMES)


def test_smollm2_template_renders_chatml_and_stops_at_im_end() -> None:
    chat_format, warning = choose_format(
        requested=None, gguf_template=SMOLLM2_TEMPLATE, architecture="llama",
        bos_token="<|im_start|>", eos_token="<|im_end|>",
    )
    assert warning is None
    assert chat_format.name == "gguf"
    assert chat_format.stop == ("<|im_end|>",)
    assert chat_format.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_format.render(CONVERSATION) == EXPECTED["chatml"]


@pytest.mark.real_model
def test_the_smollm2_gguf_carries_that_template(smollm2: Path) -> None:
    info = read_gguf(smollm2)
    assert info.chat_template == SMOLLM2_TEMPLATE
    chat_format, warning = choose_format(
        requested=None, gguf_template=info.chat_template, architecture=info.architecture,
        bos_token=info.bos_token or "", eos_token=info.eos_token or "", eot_token=info.eot_token or "",
    )
    assert (chat_format.name, chat_format.stop, warning) == ("gguf", ("<|im_end|>",), None)
    # Its BOS token is <|im_start|>, which every ChatML prompt starts with: no second one must be added.
    assert chat_format.renders_bos()


def test_gguf_stop_strings_come_from_the_template_and_the_eos_and_eot_tokens() -> None:
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    chat_format, _ = choose_format(requested="auto", gguf_template=template, architecture="gemma3",
                                   eos_token="<eos>", eot_token="<end_of_turn>")
    assert chat_format.stop == ("<end_of_turn>", "<eos>")


def test_requested_builtin_wins_over_the_gguf_template() -> None:
    chat_format, warning = choose_format(
        requested="llama3", gguf_template=SMOLLM2_TEMPLATE, architecture="llama",
        eot_token="<|eot_id|>", eos_token="<|end_of_text|>",
    )
    assert (chat_format.name, warning) == ("llama3", None)
    assert chat_format.stop == ("<|eot_id|>", "<|end_of_text|>")


def test_requested_unknown_name_is_an_error() -> None:
    with pytest.raises(TemplateError, match="choose one of chatml"):
        choose_format(requested="nope", gguf_template=SMOLLM2_TEMPLATE, architecture="llama")


def test_requested_gguf_without_a_template_is_an_error() -> None:
    with pytest.raises(TemplateError, match="has no chat template"):
        choose_format(requested="gguf", gguf_template=None, architecture="llama")


@pytest.mark.parametrize(
    ("architecture", "eos", "eot", "expected"),
    [
        ("qwen2", "<|endoftext|>", "", "chatml"),
        ("llama", "<|end_of_text|>", "<|eot_id|>", "llama3"),
        ("llama", "</s>", "", "llama2"),
        ("gemma3", "<eos>", "", "gemma"),
        ("phi3", "<|endoftext|>", "", "phi3"),
        ("gpt2", "<|endoftext|>", "", "plain"),
        ("something-new", "", "", "chatml"),
        (None, "", "", "chatml"),
    ],
)
def test_model_without_template_gets_a_builtin_and_a_warning(
    architecture: str | None, eos: str, eot: str, expected: str
) -> None:
    chat_format, warning = choose_format(requested=None, gguf_template=None, architecture=architecture,
                                         eos_token=eos, eot_token=eot)
    assert chat_format.name == expected
    assert warning == (f"model has no chat template; using '{expected}'"
                       " — it may be a base model that does not follow instructions")


def test_syntax_error_template_falls_back_with_a_warning() -> None:
    chat_format, warning = choose_format(requested=None, gguf_template="{% for m in messages %}{{ m }",
                                         architecture="qwen2")
    assert chat_format.name == "chatml"
    assert warning is not None
    assert warning.startswith("the model's chat template is unsafe or invalid (chat template is invalid:")
    assert warning.endswith("; using 'chatml'")


@pytest.mark.parametrize("template", ESCAPES)
def test_hostile_template_is_refused(template: str) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError, match=r"^chat template tried to access .*: refused$"):
        render_template(template, messages)
    assert messages == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("template", ESCAPES)
def test_hostile_gguf_template_falls_back_to_the_architecture_builtin(template: str) -> None:
    chat_format, warning = choose_format(requested=None, gguf_template=template, architecture="llama",
                                         eot_token="<|eot_id|>")
    assert chat_format.name == "llama3"
    assert warning is not None and "unsafe or invalid (chat template tried to access" in warning
    assert warning.endswith("; using 'llama3'")


def test_sandbox_escape_runs_no_command(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').close() }}"
    # Outside a sandbox the payload works, so the check below can fail.
    jinja2.Environment().from_string(payload).render()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(TemplateError, match="refused"):
        render_template(payload, [])
    chat_format, warning = choose_format(requested=None, gguf_template=payload, architecture="qwen2")
    assert chat_format.name == "chatml" and warning is not None
    assert not marker.exists()


def test_raise_exception_gives_the_templates_message() -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
    )
    expected = "^chat template rejected the conversation: System role not supported$"
    with pytest.raises(TemplateError, match=expected):
        render_template(template, CONVERSATION)
    assert render_template(template, CONVERSATION[1:]) == ""


def test_template_failing_on_the_sample_falls_back_and_says_why() -> None:
    template = "{{ raise_exception('no chat here') }}"
    chat_format, warning = choose_format(requested="auto", gguf_template=template, architecture="phi3")
    assert chat_format.name == "phi3"
    assert warning is not None and "no chat here" in warning


def test_template_ignoring_the_messages_falls_back() -> None:
    chat_format, warning = choose_format(requested=None, gguf_template="Hello", architecture="qwen2")
    assert chat_format.name == "chatml"
    assert warning is not None and "leaves out the messages" in warning


def test_requested_gguf_with_a_broken_template_is_an_error() -> None:
    with pytest.raises(TemplateError, match="chat template is invalid"):
        choose_format(requested="gguf", gguf_template="{% if %}", architecture="qwen2")


def test_transformers_globals_are_available() -> None:
    template = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ tools is none }}|{{ bos_token }}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
        "{{ m['content'] }}{% break %}{% endfor %}"
    )
    text = render_template(template, CONVERSATION[:3], bos_token="<s>")
    assert text == '[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}, ' \
        '{"role": "assistant", "content": "Hello!"}]|4|True|<s>Hi'


def test_compiled_templates_are_cached() -> None:
    jinja_sandbox._compile.cache_clear()
    builtin_format("chatml").render(CONVERSATION)
    builtin_format("chatml").render(CONVERSATION)
    assert jinja_sandbox._compile.cache_info().hits == 1


RUNAWAY = {
    "nested ranges": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
    "{% endfor %}{% endfor %}",
    "loop calling a macro": "{% macro f() %}{% endmacro %}{% for a in range(100000) %}"
    "{% for b in range(100000) %}{{ f() }}{% endfor %}{% endfor %}",
}
HUGE = {
    "string repetition": "{{ 'x' * 10**9 }}",
    "list repetition": "{{ [messages] * 10**8 }}",
    "doubling through a namespace": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list doubling with +": "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
    "{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "nested lists": "{% set a = 'x' * 100000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{{ [c, c, c, c, c, c, c, c, c, c] }}",
    "replace": "{{ ('x' * 1000) | replace('x', 'y' * 100000) }}",
    "str.replace": "{{ ('x' * 1000).replace('', 'y' * 100000) }}",
    "join": "{{ ('y' * 2000).join('x' * 10000) }}",
    "indent": "{{ ('a\n' * 100000) | indent(1000) }}",
    "format width": "{{ '{:>99999999999}'.format(1) }}",
    "% width": "{{ '%*d' % (10**9, 1) }}",
    "center width": "{{ 'x'.center(10**9) }}",
    "slice count": "{{ [1] | slice(10**9) | list }}",
    "big power": "{{ 10 ** (10 ** 10) }}",
    "tojson indent": "{{ messages | tojson(indent=10**6) }}",
    "captured output": "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}ok",
}


@pytest.mark.parametrize("template", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_runaway_loop_is_stopped_quickly(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"^chat template ran longer than 1 s: refused$"):
        render_template(template, CONVERSATION)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("template", HUGE.values(), ids=HUGE.keys())
def test_huge_value_is_refused_before_it_is_built(template: str) -> None:
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=r"^chat template .*: refused$"):
            render_template(template, CONVERSATION)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64_000_000
    assert time.monotonic() - started < 3


def test_runaway_gguf_template_falls_back() -> None:
    chat_format, warning = choose_format(requested=None, gguf_template=RUNAWAY["nested ranges"],
                                         architecture="qwen2")
    assert chat_format.name == "chatml"
    assert warning is not None and "ran longer than 1 s" in warning


def test_long_conversation_renders_within_the_budget() -> None:
    messages = [{"role": "user", "content": "x" * 3_000_000}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": "word " * 100} for i in range(3000)]
    chat_format, _ = choose_format(requested=None, gguf_template=SMOLLM2_TEMPLATE, architecture="llama")
    assert len(chat_format.render(messages)) > 4_500_000


def test_output_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jinja_sandbox, "MAX_CHARS", 1000)
    with pytest.raises(TemplateError, match="over 1,000 characters: refused"):
        render_template("{% for m in messages %}{{ m['content'] }}{% endfor %}",
                        [{"role": "user", "content": "x" * 2000}])
