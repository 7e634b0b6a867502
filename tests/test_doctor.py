"""`chatcli doctor` and `show --render`: each template defect found in a model made to have it; SmolLM2 clean.

The models are real GGUFs (tests/ggufgen.py) with a crafted chat template or tokenizer settings; the checks
run against llama.cpp's own tokenizer (vocab_only), as the command does for a user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ggufgen import CHATML_TEMPLATE, ENDOFTEXT, IM_END, make_llama, vocab

ENDS_CUSTOM = CHATML_TEMPLATE.replace("<|im_end|>", "<|turn_end|>")
NO_GEN = CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0]
RAISES = ("{% for message in messages %}{% if message['role'] == 'system' %}"
          "{{ raise_exception('System role not supported') }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
DROPS = ("{% for message in messages %}{% if message['role'] != 'system' %}"
         "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

DEFECTS: dict[str, dict] = {
    "double-bos": {"chat_template": "{{ bos_token }}" + CHATML_TEMPLATE,
                   "extra_kv": {"tokenizer.ggml.add_bos_token": True}},
    "eot-not-special": {"chat_template": ENDS_CUSTOM},
    "eot-not-stop": {"chat_template": ENDS_CUSTOM, "extra_specials": ["<|turn_end|>"]},
    "eos-eot-mismatch": {"chat_template": CHATML_TEMPLATE,
                         "extra_kv": {"tokenizer.ggml.eot_token_id": None,
                                      "tokenizer.ggml.eos_token_id": vocab().index(ENDOFTEXT)}},
    "no-generation-prompt": {"chat_template": NO_GEN},
    "system-raises": {"chat_template": RAISES},
    "system-dropped": {"chat_template": DROPS},
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_doctor_finds_each_defect(chatcli, tmp_path: Path, defect: str) -> None:
    model = make_llama(tmp_path / f"{defect}.gguf", **DEFECTS[defect])
    result = chatcli("doctor", str(model))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{defect}: ") for line in lines), result.stdout
    assert all("; fix: " in line for line in lines) and "Traceback" not in result.stderr
    as_json = chatcli("doctor", str(model), "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["clean"] is False and defect in [f["code"] for f in report["findings"]]


def test_each_defect_model_has_only_its_own_kind_of_finding(chatcli, tmp_path: Path) -> None:
    """No check fires on a model built for another (the custom special also lacks EOS/EOT, by construction)."""
    allowed = {"eot-not-stop": {"eot-not-stop", "eos-eot-mismatch"}}
    for defect, options in DEFECTS.items():
        model = make_llama(tmp_path / f"{defect}.gguf", **options)
        codes = {f["code"] for f in json.loads(chatcli("doctor", str(model), "--json").stdout)["findings"]}
        assert codes == allowed.get(defect, {defect}), (defect, codes)


def test_doctor_fixes_name_a_template_and_the_fix_works(chatcli, tmp_path: Path) -> None:
    model = make_llama(tmp_path / "nogen.gguf", chat_template=NO_GEN)
    line = chatcli("doctor", str(model)).stdout.strip()
    assert "`--chat-template chatml`" in line and 'template = "chatml"' in line
    fixed = chatcli("doctor", str(model), "--chat-template", "chatml")
    assert fixed.returncode == 0 and fixed.stdout == "" and "no problems found" in fixed.stderr


def test_doctor_clean_tiny_model_and_no_template(chatcli, tiny_llama: Path, tiny_gpt2: Path) -> None:
    clean = chatcli("doctor", str(tiny_llama))
    assert clean.returncode == 0 and clean.stdout == "", clean.stdout
    base = chatcli("doctor", str(tiny_gpt2))
    assert base.returncode == 1 and base.stdout.startswith("no-chat-template: model has no chat template")


def test_doctor_refuses_a_hostile_header_in_one_line(chatcli, tmp_path: Path) -> None:
    bad = make_llama(tmp_path / "bad.gguf", chat_template=CHATML_TEMPLATE, extra_kv={"llama.block_count": 0})
    result = chatcli("doctor", str(bad))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "block_count" in result.stderr


def test_render_marks_an_added_bos(chatcli, tmp_path: Path) -> None:
    model = make_llama(tmp_path / "bos.gguf", chat_template=CHATML_TEMPLATE,
                       extra_kv={"tokenizer.ggml.add_bos_token": True})
    result = chatcli("show", str(model), "--render", "hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"⟨+{ENDOFTEXT}⟩⟨<|im_start|>⟩user\nhello world⟨{IM_END}⟩\n⟨<|im_start|>⟩assistant\n")
    data = json.loads(chatcli("show", str(model), "--render", "hello world", "--json").stdout)
    assert data["added_bos"] == ENDOFTEXT and data["count"] == len(data["tokens"])


def test_render_needs_render_for_messages(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("show", str(tiny_gpt2), "hello")
    assert result.returncode == 2 and "--render" in result.stderr


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.real_model
def test_doctor_finds_nothing_in_smollm2(chatcli, smollm2: Path) -> None:
    result = chatcli("doctor", str(smollm2))
    assert result.returncode == 0 and result.stdout == "", result.stdout
    assert json.loads(chatcli("doctor", str(smollm2), "--json").stdout)["findings"] == []


@pytest.mark.real_model
def test_render_smollm2_is_its_template_byte_for_byte(chatcli, smollm2: Path) -> None:
    import llama_cpp
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from chatcli.gguf_info import read_gguf

    info = read_gguf(smollm2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"}]
    assert info.chat_template is not None
    expected = ImmutableSandboxedEnvironment().from_string(info.chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token=info.bos_token, eos_token=info.eos_token)
    result = chatcli("show", str(smollm2), "--render", "-s", "Be brief.", "Hello", "Hi!", "How are you?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.replace("⟨", "").replace("⟩", "") == expected
    assert result.stdout.count("⟨<|im_start|>⟩") == 5 and result.stdout.count("⟨<|im_end|>⟩") == 4
    llm = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    count = len(llm.tokenize(expected.encode(), add_bos=False, special=True))
    assert result.stderr.startswith(f"{count} tokens (gguf template)")


# ---------------------------------------------------------------- the source model's template


SOURCE = "someone/Source-Chat"


def _converted(tmp_path: Path, template: str) -> Path:
    """A GGUF whose header says it was converted from SOURCE (as convert_hf_to_gguf.py writes it)."""
    return make_llama(tmp_path / "converted.gguf", chat_template=template,
                      extra_kv={"general.base_model.count": 1,
                                "general.base_model.0.repo_url": f"https://huggingface.co/{SOURCE}"})


@pytest.mark.parametrize("filename", ["tokenizer_config.json", "chat_template.jinja"])
def test_doctor_reports_a_template_that_differs_from_its_source(chatcli, fake_hub, tmp_path: Path,
                                                                filename: str) -> None:
    source = CHATML_TEMPLATE.replace("'\\n' + message['content']", "'\\n' + message['content'] | trim")
    body = json.dumps({"chat_template": source}) if filename.endswith(".json") else source
    fake_hub.add_file(SOURCE, filename, body.encode(), lfs=False)
    model = _converted(tmp_path, CHATML_TEMPLATE.replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n\\n'"))
    result = chatcli("doctor", str(model))
    assert result.returncode == 1, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"source-template-differs: the prompt for one user message differs only in whitespace "
                           f"from the source model {SOURCE}'s ({filename})")
    assert [r.path for r in fake_hub.requests if "resolve" in r.path][-1].endswith(filename)
    offline = chatcli("doctor", str(model), "--offline")
    assert offline.returncode == 0 and offline.stdout == ""


def test_doctor_same_template_as_the_source_is_clean(chatcli, fake_hub, tmp_path: Path) -> None:
    fake_hub.add_file(SOURCE, "tokenizer_config.json", json.dumps({"chat_template": CHATML_TEMPLATE}).encode(),
                      lfs=False)
    result = chatcli("doctor", str(_converted(tmp_path, CHATML_TEMPLATE)))
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_doctor_with_the_hub_unreachable_still_checks_locally(chatcli, tmp_path: Path) -> None:
    result = chatcli("doctor", str(_converted(tmp_path, CHATML_TEMPLATE)))  # HF_ENDPOINT: a closed port
    assert result.returncode == 0 and result.stdout == "" and "Traceback" not in result.stderr
