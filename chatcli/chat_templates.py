"""Chat templates: turn chat messages into the prompt text a model expects, plus its stop strings.

A GGUF's `tokenizer.chat_template` is untrusted code (CVE-2024-34359): every template, built-ins included, is
rendered by `jinja_sandbox.render_template` (a time- and size-budgeted ImmutableSandboxedEnvironment).

BOS: the rendered text starts with the BOS text exactly when the template emits it (`{{ bos_token }}`, as
llama2, llama3, gemma and mistral do). `ChatFormat.renders_bos()` says so; the engine must then tokenize
with special tokens parsed and without adding a second BOS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from chatcli.errors import TemplateError
from chatcli.jinja_sandbox import render_template

Message = dict[str, str]

_SAMPLE: list[Message] = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "How are you?"},
]


@dataclass(frozen=True)
class ChatFormat:
    """How one model wants a conversation written out, and the strings that end its replies."""

    name: str  # "gguf" for the model's own template, else a built-in name
    source: str  # the Jinja source
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        return render_template(self.source, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token, eos_token=self.eos_token)

    def renders_bos(self) -> bool:
        """Whether rendered prompts begin with the BOS text, so the tokenizer must not add one."""
        return bool(self.bos_token) and self.render(_SAMPLE).startswith(self.bos_token)


_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}\n"
)
_ALPACA = (
    "Below is an instruction that describes a task."
    " Write a response that appropriately completes the request."
)
# name: (source, stop strings, usual BOS text, usual EOS text); the model's own tokens win over those.
_BUILTINS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "chatml": (r"""{%- for m in messages %}
{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}""", ("<|im_end|>",), "", ""),
    # Meta's Llama 2 chat format: the system prompt goes inside the first [INST] block.
    "llama2": (_SPLIT_SYSTEM + r"""{%- for m in turns %}{% if m['role'] == 'user' %}
{%- set content = ('<<SYS>>\n' + system + '\n<</SYS>>\n\n' if loop.first and system else '') + m['content'] %}
{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
{%- elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}
{%- endfor %}""", ("</s>",), "<s>", "</s>"),
    "llama3": (r"""{%- for m in messages %}{{ (bos_token if loop.first else '') + '<|start_header_id|>'
+ m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""",
               ("<|eot_id|>",), "<|begin_of_text|>", ""),
    # Gemma 3's format: there is no system role, so the system prompt opens the first user turn.
    "gemma": ("{{- bos_token }}" + _SPLIT_SYSTEM + r"""{%- for m in turns %}
{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'
+ (system + '\n\n' if loop.first and system else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}""", ("<end_of_turn>",), "<bos>", ""),
    # Phi-3.5-mini-instruct's format.
    "phi3": (r"""{%- for m in messages %}
{%- if m['role'] in ('system', 'user', 'assistant') and m['content'] %}
{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}""",
             ("<|end|>",), "", "<|endoftext|>"),
    # Mistral-7B-Instruct-v0.1's format; a system prompt opens the first user turn, as in later Mistrals.
    "mistral": ("{{- bos_token }}" + _SPLIT_SYSTEM + r"""{%- for m in turns %}{% if m['role'] == 'user' %}
{{- '[INST] ' + (system + '\n\n' if loop.first and system else '') + m['content'] + ' [/INST]' }}
{%- elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}""",
                ("</s>",), "<s>", "</s>"),
    # Stanford Alpaca's prompt, continued turn by turn; a system message replaces the preamble.
    "alpaca": (_SPLIT_SYSTEM + "{{- (system or '" + _ALPACA + r"""') + '\n\n' }}{% for m in turns %}
{%- if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}
{%- elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}
{%- if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}""", ("### Instruction:",), "", ""),
    # A plain transcript for base models: the system text, then "User: ..." and "Assistant: ..." lines.
    "plain": (r"""{%- for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}
{%- elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}
{%- else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}
{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}""", ("\nUser:",), "", ""),
}
BUILTIN_NAMES: tuple[str, ...] = tuple(_BUILTINS)
# End-of-turn markers that, found in a GGUF template, become stop strings.
_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
            "<|END_OF_TURN_TOKEN|>", "<｜end▁of▁sentence｜>")


def _unique(strings: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s in strings if s))


def builtin_format(name: str, *, bos_token: str = "", eos_token: str = "") -> ChatFormat:
    """A built-in format, with the model's BOS/EOS texts where known, else the family's usual ones."""
    if name not in _BUILTINS:
        raise TemplateError(f"unknown chat template {name!r}: choose one of {', '.join(BUILTIN_NAMES)}")
    source, stops, usual_bos, usual_eos = _BUILTINS[name]
    bos, eos = bos_token or usual_bos, eos_token or usual_eos
    return ChatFormat(name, source, bos, eos, _unique((*stops, eos)))


def _builtin_for(architecture: str | None, eos_token: str, eot_token: str) -> str:
    """The built-in a model most likely wants: by its end-of-turn token, else by its family."""
    by_token = {"<|im_end|>": "chatml", "<|eot_id|>": "llama3", "<end_of_turn>": "gemma", "<|end|>": "phi3"}
    for token in (eot_token, eos_token):
        if token in by_token:
            return by_token[token]
    arch = (architecture or "").lower()
    if arch in ("gpt2", "gptj", "gptneox", "bloom", "mpt", "starcoder"):
        return "plain"
    for prefix, name in (("gemma", "gemma"), ("phi3", "phi3"), ("mistral", "mistral"), ("llama", "llama2")):
        if arch.startswith(prefix):
            return name
    return "chatml"  # qwen, smollm and most recent instruction-tuned models


def choose_format(
    *, requested: str | None, gguf_template: str | None, architecture: str | None,
    bos_token: str = "", eos_token: str = "", eot_token: str = "",
) -> tuple[ChatFormat, str | None]:
    """The format to chat with, and a warning for the user when it is a guess.

    `requested`: None or "auto" (the GGUF's template, else a built-in picked from the model), "gguf" (the
    GGUF's template or an error), or a built-in name. A GGUF template that fails a sample render, being
    unsafe or broken, gives way to a built-in, with a warning that says why.
    """
    if requested not in (None, "auto", "gguf"):
        chosen = builtin_format(requested, bos_token=bos_token, eos_token=eos_token)
        return replace(chosen, stop=_unique((*chosen.stop, eot_token))), None
    name = _builtin_for(architecture, eos_token, eot_token)
    fallback = builtin_format(name, bos_token=bos_token, eos_token=eos_token)
    fallback = replace(fallback, stop=_unique((*fallback.stop, eot_token)))
    if gguf_template and gguf_template.strip():
        stop = _unique((*(m for m in _MARKERS if m in gguf_template), eos_token, eot_token))
        own = ChatFormat("gguf", gguf_template, bos_token, eos_token, stop)
        try:
            if _SAMPLE[-1]["content"] not in own.render(_SAMPLE):
                raise TemplateError("chat template leaves out the messages")
        except TemplateError as exc:
            if requested == "gguf":
                raise
            return fallback, f"the model's chat template is unsafe or invalid ({exc}); using {name!r}"
        return own, None
    if requested == "gguf":
        raise TemplateError(f"the model has no chat template: name one of {', '.join(BUILTIN_NAMES)}")
    return fallback, (f"model has no chat template; using {name!r}"
                      " — it may be a base model that does not follow instructions")
