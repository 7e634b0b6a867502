"""Prompt templates: the user's TOML files in <config>/templates, rendered without str.format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatcli import prompt_templates as pt
from chatcli.engine import SamplingOptions
from chatcli.errors import TemplateError, UsageError

SUMMARISE = '''
description = "Summarise text in N bullet points"
system = "You are a concise assistant."
prompt = "Summarise this in {bullets} bullet points:\\n\\n{input}"
model = "smollm2"
[defaults]
bullets = "3"
[options]
temperature = 0.3
max_tokens = 200
stop = ["END"]
'''


def write_template(home: Path, name: str, text: str) -> Path:
    path = home / "config" / "templates" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make(prompt: str | None = None, system: str | None = None, **defaults: str) -> pt.PromptTemplate:
    return pt.PromptTemplate(name="t", path=Path("t.toml"), prompt=prompt, system=system, defaults=defaults)


# ---------------------------------------------------------------- loading


def test_load_template_reads_every_field(home: Path) -> None:
    path = write_template(home, "summarise", SUMMARISE)
    template = pt.load_template("summarise")
    assert template.name == "summarise"
    assert template.path == path == pt.template_path("summarise")
    assert template.description == "Summarise text in N bullet points"
    assert template.system == "You are a concise assistant."
    assert template.model == "smollm2"
    assert template.defaults == {"bullets": "3"}
    assert template.options == {"temperature": 0.3, "max_tokens": 200, "stop": ["END"]}
    assert template.variables == ["bullets"]
    assert template.error is None


def test_templates_live_in_the_config_dir(home: Path) -> None:
    assert pt.templates_dir() == home / "config" / "templates"


def test_option_names_are_sampling_options_fields() -> None:
    assert set(pt.OPTIONS) <= {f.name for f in dataclasses.fields(SamplingOptions)}


def test_integer_options_become_floats_where_the_option_is_a_float(home: Path) -> None:
    write_template(home, "t", 'prompt = "{input}"\n[options]\ntemperature = 1\ntop_k = 5\n')
    options = pt.load_template("t").options
    assert options == {"temperature": 1.0, "top_k": 5}
    assert isinstance(options["temperature"], float)


def test_numeric_defaults_become_strings(home: Path) -> None:
    write_template(home, "t", 'prompt = "{n} {input}"\n[defaults]\nn = 3\n')
    assert pt.load_template("t").defaults == {"n": "3"}


def test_unknown_template_suggests_a_close_name(home: Path) -> None:
    write_template(home, "summarise", SUMMARISE)
    with pytest.raises(TemplateError) as info:
        pt.load_template("sumarise")
    assert str(info.value) == (
        "no template 'sumarise': see `chatcli templates list` (did you mean 'summarise'?)"
    )


def test_unknown_template_without_templates_dir(home: Path) -> None:
    with pytest.raises(TemplateError, match=r"^no template 'x': see `chatcli templates list`$"):
        pt.load_template("x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('prompt = "a"\nsystem = \n', r"invalid TOML: .*\(at line 2, column 10\)"),
        ('prompt = "a"\nbogus = 1\n', r"unknown key 'bogus' \(allowed: description, system"),
        ("prompt = 3\n", r"'prompt' must be a string"),
        ('model = ["a"]\n', r"'model' must be a string"),
        ('defaults = "x"\n', r"'defaults' must be a table"),
        ('prompt = "{n}"\n[defaults]\nn = true\n', r"\[defaults\] n must be a string"),
        ('prompt = "{input}"\n[defaults]\nunused = "1"\n', r"\[defaults\] unused is not used"),
        ('[options]\ntemp = 0.5\n', r"unknown option 'temp' in \[options\]: did you mean 'temperature'\?"),
        ('[options]\ntemperature = "hot"\n', r"\[options\] temperature must be a number, got 'hot'"),
        ("[options]\nmax_tokens = 1.5\n", r"\[options\] max_tokens must be a whole number"),
        ("[options]\nseed = true\n", r"\[options\] seed must be a whole number"),
        ('[options]\nstop = "x"\n', r"\[options\] stop must be a list of non-empty strings"),
        ("[options]\nstop = [1]\n", r"\[options\] stop must be a list of non-empty strings"),
        ("[options]\ntemperature = 9\n", r"\[options\]: temperature must be between 0 and 5"),
        ('prompt = "{0}"\n', r"'prompt': unsupported placeholder '\{0\}'"),
        ('system = "a { b"\n', r"'system': single '\{': write \{\{ for a literal brace"),
    ],
)
def test_malformed_file_names_the_file_and_the_problem(home: Path, text: str, expected: str) -> None:
    path = write_template(home, "bad", text)
    with pytest.raises(TemplateError, match=expected) as info:
        pt.load_template("bad")
    assert str(info.value).startswith(f"{path}: ")


def test_non_utf8_file_is_a_template_error(home: Path) -> None:
    path = write_template(home, "bad", "")
    path.write_bytes(b'prompt = "\xff"\n')
    with pytest.raises(TemplateError, match="not UTF-8"):
        pt.load_template("bad")


def test_validate_file_checks_any_path(tmp_path: Path) -> None:
    path = tmp_path / "draft.toml"
    path.write_text('prompt = "{input}"\nmodle = "x"\n')
    with pytest.raises(TemplateError, match=f"^{path}: unknown key 'modle'"):
        pt.validate_file(path)
    path.write_text('prompt = "{input}"\nmodel = "x"\n')
    assert pt.validate_file(path).model == "x"


def test_new_template_text_is_a_valid_template(tmp_path: Path) -> None:
    text = pt.new_template_text("mine")
    assert "chatcli complete -t mine" in text
    path = tmp_path / "mine.toml"
    path.write_text(text)
    template = pt.validate_file(path)
    assert template.prompt == "{input}"
    assert template.render("hello", {}) == (None, "hello")


# ---------------------------------------------------------------- listing


def test_list_templates_survives_a_bad_file(home: Path) -> None:
    write_template(home, "b-broken", "prompt = \n")
    write_template(home, "a-good", 'description = "first"\nprompt = "{input}"\n')
    write_template(home, "c-good", 'description = "last"\n')
    (home / "config" / "templates" / "notes.txt").write_text("not a template")
    listed = pt.list_templates()
    assert [t.name for t in listed] == ["a-good", "b-broken", "c-good"]
    assert [t.description for t in listed] == ["first", "", "last"]
    assert listed[0].error is None and listed[2].error is None
    assert listed[1].error is not None and "b-broken.toml: invalid TOML" in listed[1].error


def test_list_templates_without_a_dir_is_empty() -> None:
    assert pt.list_templates() == []


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "", ".hidden", "..", "a b", "/etc/passwd", "x" * 101]
)
def test_template_path_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid template name"):
        pt.template_path(name)


def test_load_template_rejects_traversal_before_touching_the_disk(home: Path) -> None:
    write_template(home, "ok", 'prompt = "{input}"\n')
    (home / "config" / "secret.toml").write_text('prompt = "secret"\n')
    with pytest.raises(UsageError, match="invalid template name"):
        pt.load_template("../secret")


@pytest.mark.parametrize("name", ["summarise", "code-review", "v1.2", "_x", "A9"])
def test_template_path_accepts_plain_names(home: Path, name: str) -> None:
    assert pt.template_path(name) == home / "config" / "templates" / f"{name}.toml"


# ---------------------------------------------------------------- rendering


def test_render_fills_input_variables_and_defaults(home: Path) -> None:
    write_template(home, "summarise", SUMMARISE)
    template = pt.load_template("summarise")
    assert template.render("TEXT", {}) == (
        "You are a concise assistant.",
        "Summarise this in 3 bullet points:\n\nTEXT",
    )
    assert template.render("TEXT", {"bullets": "5"})[1] == "Summarise this in 5 bullet points:\n\nTEXT"


def test_render_substitutes_variables_in_the_system_prompt() -> None:
    template = make(prompt="{input}", system="You speak {lang}.")
    assert template.variables == ["lang"]
    assert template.render("hi", {"lang": "French"}) == ("You speak French.", "hi")


def test_variables_are_in_order_of_first_use_without_input() -> None:
    template = make(system="{b} {a}", prompt="{input} {a} {c} {b}")
    assert template.variables == ["b", "a", "c"]


def test_missing_variable_says_which_var_to_pass() -> None:
    template = make(prompt="{input} in {bullets}")
    with pytest.raises(UsageError, match=r"^template 't' needs --var bullets=VALUE$"):
        template.render("x", {})


def test_unknown_variable_lists_the_templates_variables() -> None:
    template = make(prompt="{input} {a} {b}", a="1", b="2")
    with pytest.raises(UsageError, match=r"^template 't' has no variable 'c' \(its variables: a, b\)$"):
        template.render("x", {"c": "3"})
    with pytest.raises(UsageError, match=r"it has no variables"):
        make(prompt="{input}").render("x", {"input": "y"})


def test_no_input_field_appends_the_input_after_a_blank_line() -> None:
    template = make(prompt="Translate to French:\n")
    assert template.render("cheese", {}) == (None, "Translate to French:\n\ncheese")
    assert template.render(None, {}) == (None, "Translate to French:\n")


def test_system_only_template_uses_the_input_as_the_prompt() -> None:
    template = make(system="Be brief.")
    assert template.render("hello", {}) == ("Be brief.", "hello")
    assert template.render(None, {}) == ("Be brief.", "")


def test_input_field_without_input_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="needs input"):
        make(prompt="Fix: {input}").render(None, {})


def test_input_in_the_system_prompt_is_not_appended_again() -> None:
    assert make(system="Context: {input}", prompt="Answer.").render("C", {}) == ("Context: C", "Answer.")


def test_double_braces_are_literal() -> None:
    template = make(prompt='Reply as JSON {{"n": {n}}} about {input}, not {{input}}', n="1")
    assert template.variables == ["n"]
    assert template.render("cats", {}) == (None, 'Reply as JSON {"n": 1} about cats, not {input}')


def test_values_are_inserted_literally_and_never_reparsed() -> None:
    template = make(prompt="{a} / {input}")
    rendered = template.render("{a} {0.__class__} {{", {"a": "{input} }"})
    assert rendered == (None, "{input} } / {a} {0.__class__} {{")


@pytest.mark.parametrize(
    "hostile",
    ["{input.__class__}", "{0}", "{}", "{input!r}", "{input:>10}", "{a[0]}", "{0.__class__.__mro__}", "}"],
)
def test_hostile_fields_are_rejected_not_evaluated(hostile: str) -> None:
    template = make(prompt=f"x {hostile} y")
    with pytest.raises(TemplateError, match=r"t\.toml: 'prompt': (unsupported placeholder|single)"):
        template.render("in", {})
    with pytest.raises(TemplateError):
        _ = template.variables


# ---------------------------------------------------------------- --var


def test_parse_vars() -> None:
    assert pt.parse_vars([]) == {}
    assert pt.parse_vars(["a=1", "b=x=y", "c=", "a=2"]) == {"a": "2", "b": "x=y", "c": ""}


@pytest.mark.parametrize("pair", ["novalue", "=x", "a b=1", "1a=x", "a.b=c"])
def test_parse_vars_rejects_bad_pairs(pair: str) -> None:
    with pytest.raises(UsageError, match=f"^invalid --var '{pair}': use NAME=VALUE$"):
        pt.parse_vars([pair])
