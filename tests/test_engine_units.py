"""Engine pieces that need no model: stop-string scanning, context and GPU-layer choice, option checks."""

from __future__ import annotations

import random

import pytest

from chatcli.engine import (
    InvalidSetting,
    SamplingOptions,
    StopScanner,
    choose_context,
    physical_cores,
    resolve_gpu_layers,
)
from chatcli.errors import UsageError


def scan(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = []
    for chunk in chunks:
        text, stopped = scanner.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_are_found_however_the_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab<|>e nd"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stops = ["<|end|>", "and", "bb"][: rng.randint(0, 3)]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 10))))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(found)] if found else text
    assert scan(chunks, stops) == (expected, bool(found))


def test_held_back_text_is_released_when_it_cannot_start_a_stop() -> None:
    scanner = StopScanner(["<|im_end|>"])
    assert scanner.feed("Hello <|im") == ("Hello ", False)
    assert scanner.feed("age") == ("<|image", False)


def test_context_is_clamped_to_the_trained_length_and_memory() -> None:
    assert choose_context(None, 8192, 1024, None) == 1024  # GPT-2: never past n_ctx_train
    assert choose_context(4096, None, 2048, None) == 2048
    assert choose_context(None, None, None, None) == 4096
    huge_kv = 10**9  # a gigabyte per token: memory caps the window (never below 512)
    assert choose_context(None, 8192, 32768, huge_kv) == 512
    assert choose_context(100, None, 32768, huge_kv) == 100  # what the user asked for wins


def test_gpu_layers() -> None:
    assert resolve_gpu_layers("all") == -1
    assert resolve_gpu_layers("12") == 12
    assert resolve_gpu_layers("auto") in (-1, 0)
    for bad in ("lots", "-5"):
        with pytest.raises(UsageError, match="--gpu-layers"):
            resolve_gpu_layers(bad)


def test_physical_cores_is_positive() -> None:
    assert 1 <= physical_cores() <= 4096


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (SamplingOptions(max_tokens=-1), "max_tokens"),
        (SamplingOptions(temperature=-0.1), "temperature"),
        (SamplingOptions(top_p=1.5), "top_p"),
        (SamplingOptions(top_k=-1), "top_k"),
        (SamplingOptions(min_p=2), "min_p"),
        (SamplingOptions(repeat_penalty=0), "repeat_penalty"),
        (SamplingOptions(seed=-3), "seed"),
        (SamplingOptions(stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_options_name_the_setting(options: SamplingOptions, name: str) -> None:
    with pytest.raises(InvalidSetting, match=f"^{name} must ") as info:
        options.validate()
    assert info.value.name == name  # each front end words it its own way (--top-p, /set top_p)
