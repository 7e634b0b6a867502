"""See the exact prompt, and catch broken chat templates, by checking the template against the tokenizer.

Most "the model answers nonsense" reports are template problems that no error reveals: a BOS the template
writes and the tokenizer adds again, an end-of-turn marker that is plain text (so the model never emits it as
one token) or that nothing stops on, a template without a generation prompt, one that raises on or silently
drops the system message, or a turn end that is neither the model's EOS nor its EOT. Each needs the rendered
text *and* the tokenizer: the vocabulary is loaded through llama.cpp with vocab_only=True (no weights, well
under a second), after the same header checks as a full load, so the verdicts are llama.cpp's own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatcli.chat_templates import ChatFormat, Message, choose_format
from chatcli.engine import common_prefix
from chatcli.errors import TemplateError
from chatcli.gguf_info import GGUFInfo, read_gguf

_ATTR_CONTROL = 1 << 3  # llama_token_attr: LLAMA_TOKEN_ATTR_CONTROL
_ATTR_USER_DEFINED = 1 << 4
PROBE_SYSTEM = "DOCTOR-SYSTEM-PROBE"
PROBE_USER = "DOCTOR-USER-PROBE"
PROBE_REPLY = "DOCTOR-REPLY-PROBE"


@dataclass(frozen=True)
class Finding:
    code: str  # double-bos, eot-not-special, eot-not-stop, eos-eot-mismatch, no-generation-prompt, ...
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.code}: {self.message}; fix: {self.fix}"


class Tokenizer:
    """A model's vocabulary in llama.cpp, without its weights."""

    def __init__(self, path: Path, info: GGUFInfo) -> None:
        from chatcli.engine import load_llama
        from chatcli.gguf_checks import check_loadable

        check_loadable(info)  # values llama.cpp would abort on never reach it
        self._llm: Any = load_llama(path, label=path.name, vocab_only=True)
        self._vocab = self._llm._model.vocab

    @property
    def add_bos(self) -> bool:
        return bool(self._llm._model.add_bos_token())

    @property
    def bos(self) -> int:
        return int(self._llm.token_bos())

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def is_special(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_attr(self._vocab, token) & (_ATTR_CONTROL | _ATTR_USER_DEFINED))

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def text(self, token: int) -> str:
        import llama_cpp

        return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")


def _format(info: GGUFInfo, requested: str | None) -> tuple[ChatFormat, str | None]:
    return choose_format(requested=requested or "auto", gguf_template=info.chat_template,
                         architecture=info.architecture, bos_token=info.bos_token or "",
                         eos_token=info.eos_token or "", eot_token=info.eot_token or "")


# ---------------------------------------------------------------- show --render


@dataclass(frozen=True)
class Rendered:
    text: str  # exactly what is tokenized
    tokens: list[int]
    added_bos: str | None  # the BOS text the tokenizer puts in front, not part of `text`
    special: list[str]  # texts of the special tokens found in `text`, in order of first appearance
    template: str  # "gguf" or a built-in's name
    warning: str | None

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "count": len(self.tokens)}


def render(path: Path, messages: list[Message], *, requested: str | None = None) -> Rendered:
    """The prompt the model receives for `messages` (with the generation prompt), tokenized by llama.cpp."""
    info = read_gguf(path)
    fmt, warning = _format(info, requested)
    text = fmt.render(messages, add_generation_prompt=True)
    tok = Tokenizer(path, info)
    bos_text = info.bos_token
    add = tok.add_bos and not (bos_text and text.startswith(bos_text))  # prompting.wants_bos
    tokens = tok.tokenize(text, add_bos=add)
    special = list(dict.fromkeys(tok.text(t) for t in tokens[1 if add else 0:] if tok.is_special(t)))
    return Rendered(text, tokens, tok.text(tok.bos) if add else None, [s for s in special if s and s in text],
                    fmt.name, warning)


OPEN, CLOSE = "⟨", "⟩"  # marks a special token in plain output; ⟨+X⟩ is a token the tokenizer adds


def marked(rendered: Rendered) -> list[tuple[str, bool]]:
    """The prompt as (piece, is_special) runs: special token texts separated from ordinary text."""
    pieces: list[tuple[str, bool]] = []
    if rendered.special:
        pattern = re.compile("|".join(re.escape(s) for s in sorted(rendered.special, key=len, reverse=True)))
        pos = 0
        for m in pattern.finditer(rendered.text):
            if m.start() > pos:
                pieces.append((rendered.text[pos:m.start()], False))
            pieces.append((m.group(0), True))
            pos = m.end()
        if pos < len(rendered.text):
            pieces.append((rendered.text[pos:], False))
    else:
        pieces.append((rendered.text, False))
    return pieces


def plain_marked(rendered: Rendered) -> str:
    """The prompt with each special token as ⟨TEXT⟩ and an added BOS as ⟨+TEXT⟩: drop those marks to get it back."""
    head = f"{OPEN}+{rendered.added_bos}{CLOSE}" if rendered.added_bos else ""
    return head + "".join(f"{OPEN}{piece}{CLOSE}" if special else piece for piece, special in marked(rendered))


# ---------------------------------------------------------------- doctor


def diagnose(path: Path, *, requested: str | None = None, catalogue_template: str | None = None,
             online: bool = True) -> list[Finding]:
    """Every template problem found, one Finding each (empty when the template and tokenizer agree).

    online: also compare with the template of the model the GGUF was converted from, when its header names
    one and the Hub answers.
    """
    findings = _diagnose(path, requested=requested, catalogue_template=catalogue_template)
    info = read_gguf(path)
    if online and not (requested or catalogue_template) and info.chat_template:
        findings += compare_with_source(info)
    return findings


def _diagnose(path: Path, *, requested: str | None, catalogue_template: str | None) -> list[Finding]:
    info = read_gguf(path)
    wanted = requested or catalogue_template
    fmt, warning = _format(info, wanted)
    fallback = choose_format(requested="auto", gguf_template=None, architecture=info.architecture,
                             bos_token=info.bos_token or "", eos_token=info.eos_token or "",
                             eot_token=info.eot_token or "")[0].name
    use = f"`--chat-template {fallback}` (or `template = \"{fallback}\"` in the model's catalogue entry)"
    findings: list[Finding] = []
    if fmt.name != "gguf" and not wanted:
        reason = warning or "the model's chat template is not used"
        findings.append(Finding("no-chat-template", reason, f"if it is a chat model, use {use}"))
        return findings
    tok = Tokenizer(path, info)
    user: list[Message] = [{"role": "user", "content": PROBE_USER}]

    def attempt(messages: list[Message], gen: bool) -> str | TemplateError:
        try:
            return fmt.render(messages, add_generation_prompt=gen)
        except TemplateError as exc:
            return exc

    with_gen, without_gen = attempt(user, True), attempt(user, False)
    if isinstance(with_gen, TemplateError) or isinstance(without_gen, TemplateError):
        error = with_gen if isinstance(with_gen, TemplateError) else without_gen
        findings.append(Finding("template-error", f"the template fails on one user message ({error})", f"use {use}"))
        return findings

    # 1. BOS written by the template and added again by the tokenizer.
    tokens = tok.tokenize(with_gen, add_bos=False)
    if tokens and tokens[0] == tok.bos and tok.add_bos:
        findings.append(Finding(
            "double-bos",
            f"the template starts with the BOS token {tok.text(tok.bos)!r} and the tokenizer adds one too "
            "(tokenizer.ggml.add_bos_token is true): runtimes that add it get two",
            "remove `{{ bos_token }}` from the template, or set tokenizer.ggml.add_bos_token to false in the GGUF "
            f"(gguf_set_metadata.py); or use {use}; chatcli itself skips the second BOS"))

    # 2. A generation prompt: the assistant's turn must be opened for the model.
    if with_gen == without_gen:
        findings.append(Finding(
            "no-generation-prompt",
            "the template ignores add_generation_prompt: nothing opens the assistant's turn, so the model may "
            "continue the user's message", f"use {use}"))

    # 3. The system role: raising on it, or dropping it without a word.
    system = attempt([{"role": "system", "content": PROBE_SYSTEM}, *user], True)
    if isinstance(system, TemplateError):
        findings.append(Finding(
            "system-raises", f"the template raises on a system message ({system})",
            f"do not pass -s/--system, or use {use} (built-ins without a system role fold it into the first "
            "user turn)"))
    elif PROBE_SYSTEM not in system:
        findings.append(Finding(
            "system-dropped", "the template silently drops the system message",
            f"use {use}, or put the instructions in the first user message"))

    # 4. The end of an assistant turn: one special token, that generation stops on, and the model's EOS/EOT.
    turn = attempt([*user, {"role": "assistant", "content": PROBE_REPLY}], False)
    if isinstance(turn, str) and PROBE_REPLY in turn:
        after = turn.split(PROBE_REPLY, 1)[1].strip()
        marker = after.split()[0] if after else ""
        ids = tok.tokenize(marker, add_bos=False) if marker else []
        if not marker:
            findings.append(Finding(
                "eot-not-special", "the template writes nothing after an assistant reply: no end-of-turn marker",
                f"use {use}"))
        elif len(ids) != 1 or not tok.is_special(ids[0]):
            findings.append(Finding(
                "eot-not-special",
                f"the end-of-turn text {marker!r} is not a special token (it is {len(ids)} ordinary tokens), so "
                "the model cannot emit it as one and replies run on", f"use {use}"))
        else:
            tid = ids[0]
            if not tok.is_end_of_generation(tid) and marker not in fmt.stop:
                findings.append(Finding(
                    "eot-not-stop",
                    f"the end-of-turn token {marker!r} (id {tid}) is not an end-of-generation token and not among "
                    f"the stop strings ({', '.join(map(repr, fmt.stop)) or 'none'}): generation runs past the turn",
                    f"set tokenizer.ggml.eot_token_id to {tid} in the GGUF (gguf_set_metadata.py), or use {use}"))
            if tid not in (info.eos_token_id, info.eot_token_id):
                eos = f"{info.eos_token!r} (id {info.eos_token_id})" if info.eos_token_id is not None else "unset"
                eot = f"{info.eot_token!r} (id {info.eot_token_id})" if info.eot_token_id is not None else "unset"
                findings.append(Finding(
                    "eos-eot-mismatch",
                    f"turns end with {marker!r} (id {tid}), but the model's EOS is {eos} and its EOT {eot}: "
                    "runtimes that stop on those ids only run past the turn",
                    f"set tokenizer.ggml.eot_token_id to {tid} in the GGUF (gguf_set_metadata.py), or use {use}"))
    return findings


# ---------------------------------------------------------------- the source model's own template

# Conversations both templates render (ggufdoctor's core fixtures): what differs here reaches the model.
FIXTURES: dict[str, tuple[list[Message], bool]] = {
    "one user message": ([{"role": "user", "content": "Hello"}], True),
    "system + user": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], True),
    "three turns": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey!"},
                     {"role": "user", "content": "Bye"}], True),
    "no generation prompt": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
}
_REPO_URL = re.compile(r"^https?://[^/]+/([\w.-]+/[\w.-]+?)/?$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")  # transformers' order


def source_repo(info: GGUFInfo) -> str | None:
    """The Hub repo the GGUF says it was converted from (general.base_model.0.* / general.source.*), if any."""
    for key in ("general.base_model.0.repo_url", "general.source.repo_url"):
        url = info.metadata.get(key)
        match = _REPO_URL.match(url.strip()) if isinstance(url, str) else None
        if match:
            return match.group(1)
    repo = info.metadata.get("general.source.huggingface.repository")
    return repo if isinstance(repo, str) and _REPO_ID.match(repo) else None


def _fetch_text(repo: str, filename: str) -> str | None:
    """A small file of a Hub repo as text (None when the repo has no such file), through huggingface_hub."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from chatcli import hub, paths

    url = hf_hub_url(repo, filename, endpoint=paths.hf_endpoint())

    def call() -> str | None:
        try:
            resp = get_session().get(url, headers=build_hf_headers(), follow_redirects=True, timeout=30)
            hf_raise_for_status(resp)
        except (hf.EntryNotFoundError, hf.RemoteEntryNotFoundError):
            return None
        if len(resp.content) > 4 << 20:
            return None
        return resp.content.decode("utf-8", "replace")

    return hub._with_retries(call, repo, filename, "main")  # type: ignore[return-value]


def source_template(repo: str) -> tuple[str, str] | None:
    """(template, file) from the source repo, in the order transformers reads them; None if it has none."""
    import json

    for filename in TEMPLATE_FILES:
        text = _fetch_text(repo, filename)
        if text is None:
            continue
        if filename.endswith(".jinja"):
            if text.strip():
                return text, filename
            continue
        try:
            data = json.loads(text)
        except ValueError:
            continue
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template.strip():
            return template, filename
    return None


def _excerpt(text: str, at: int) -> str:
    return repr(text[max(0, at - 20):at + 30])


def compare_with_source(info: GGUFInfo) -> list[Finding]:
    """A finding when the GGUF's template renders differently from its source model's, on common conversations."""
    from chatcli import paths
    from chatcli.errors import ChatcliError
    from chatcli.hub import HubUnreachableError
    from chatcli.jinja_sandbox import render_template

    repo = source_repo(info)
    if repo is None or paths.hf_offline() or info.chat_template is None:
        return []
    try:
        found = source_template(repo)
    except HubUnreachableError:
        return []  # offline: the local checks stand on their own
    except ChatcliError as exc:
        return [Finding("source-unavailable", f"the source model {repo}'s template could not be read ({exc})",
                        "set HF_TOKEN if it is gated, or pass --offline")]
    if found is None:
        return []
    template, filename = found
    bos, eos = info.bos_token or "", info.eos_token or ""
    for name, (messages, gen) in FIXTURES.items():
        try:
            ours = render_template(info.chat_template, messages, add_generation_prompt=gen, bos_token=bos,
                                   eos_token=eos)
            theirs = render_template(template, messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)
        except TemplateError:
            continue  # a side that cannot render this conversation is the other checks' business
        if ours == theirs:
            continue
        at = common_prefix(ours, theirs)
        kind = "only in whitespace" if "".join(ours.split()) == "".join(theirs.split()) else "in content"
        return [Finding(
            "source-template-differs",
            f"the prompt for {name} differs {kind} from the source model {repo}'s ({filename}) from character {at}: "
            f"GGUF {_excerpt(ours, at)} vs source {_excerpt(theirs, at)}",
            f"put the source's template in the GGUF (gguf_new_metadata.py --chat-template-config "
            f"{filename if filename.endswith('.json') else 'tokenizer_config.json'}), or use a GGUF converted "
            "with it")]
    return []
