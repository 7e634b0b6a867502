"""ggml / GGUF type tables and quant names: what the numbers in a GGUF header mean.

Taken from the gguf package's constants (gguf/constants.py) and hardcoded, so reading a header imports
nothing heavy; tests/test_gguf_info.py checks these tables against the installed gguf package.
"""

from __future__ import annotations

import functools
import re
import struct
from pathlib import Path

# GGUF value types (gguf/constants.py GGUFValueType): id -> (name, struct format or None).
_T_STRING = 8
_T_ARRAY = 9
_T_BOOL = 7
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<B"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_SCALAR_STRUCTS = {t: struct.Struct(fmt) for t, (_, fmt) in VALUE_TYPES.items() if fmt is not None}

# GGML tensor types (gguf/constants.py GGMLQuantizationType and GGML_QUANT_SIZES, gguf 0.19):
# id -> (name, elements per block, bytes per block).
TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# llama_ftype (general.file_type; gguf/constants.py LlamaFileType) -> quant name.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",  # removed upstream; old files still carry it
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    33: "Q4_0_4_4",  # removed upstream (runtime repacking); old files still carry them
    34: "Q4_0_4_8",
    35: "Q4_0_8_8",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}
_FTYPE_GUESSED = 1024

# Approximate bits per weight of whole files, for ordering quants (not for size estimates).
QUANT_BITS: dict[str, float] = {
    "Q1_0": 1.1,
    "IQ1_S": 1.56,
    "TQ1_0": 1.69,
    "IQ1_M": 1.75,
    "IQ2_XXS": 2.06,
    "TQ2_0": 2.06,
    "IQ2_XS": 2.31,
    "IQ2_S": 2.5,
    "IQ2_M": 2.7,
    "Q2_K_S": 2.9,
    "Q2_K": 3.0,
    "Q2_K_XL": 3.1,
    "IQ3_XXS": 3.06,
    "IQ3_XS": 3.3,
    "IQ3_S": 3.44,
    "Q3_K": 3.44,
    "Q3_K_S": 3.5,
    "IQ3_M": 3.66,
    "Q3_K_M": 3.91,
    "Q3_K_XL": 4.0,
    "IQ4_XS": 4.25,
    "MXFP4": 4.25,
    "MXFP4_MOE": 4.25,
    "Q3_K_L": 4.27,
    "NVFP4": 4.5,
    "IQ4_NL": 4.5,
    "Q4_0": 4.55,
    "Q4_0_4_4": 4.55,
    "Q4_0_4_8": 4.55,
    "Q4_0_8_8": 4.55,
    "Q4_K": 4.58,
    "Q4_K_S": 4.58,
    "Q4_K_M": 4.89,
    "Q4_K_XL": 5.0,
    "Q4_1": 5.0,
    "Q4_1_SOME_F16": 5.1,
    "Q5_0": 5.5,
    "Q5_K": 5.54,
    "Q5_K_S": 5.54,
    "Q5_K_M": 5.7,
    "Q5_K_XL": 5.8,
    "Q5_1": 6.0,
    "Q6_K": 6.56,
    "Q6_K_XL": 6.7,
    "Q8_0": 8.5,
    "Q8_K_XL": 9.0,
    "F16": 16.0,
    "BF16": 16.0,
    "F32": 32.0,
}

_QUANT_ALIASES = {"FP16": "F16", "FP32": "F32"}


@functools.cache
def _quant_re() -> re.Pattern[str]:
    # Longest first, so Q4_K_M wins over Q4_K at the same position. Compiled on first use:
    # the alternation costs milliseconds that `chatcli --help` should not pay.
    tags = sorted([*QUANT_BITS, *_QUANT_ALIASES], key=len, reverse=True)
    alternation = "|".join(re.escape(t) for t in tags)
    return re.compile(rf"(?<![A-Za-z0-9])({alternation})(?![A-Za-z0-9])", re.IGNORECASE)


def quant_from_filename(name: str) -> str | None:
    """The quant tag in a GGUF file name ("qwen2.5-0.5b-instruct-q4_k_m.gguf" -> "Q4_K_M"), or None.

    Only llama.cpp quant names count: a bare "q4" (Phi-3's "Phi-3-mini-4k-instruct-q4.gguf")
    says which family but not which quant, so it gives None; read general.file_type instead.
    When several tags appear, the last one wins (the quant usually ends the name).
    """
    stem = Path(name).name
    matches = _quant_re().findall(stem)
    if not matches:
        return None
    tag = matches[-1].upper()
    return _QUANT_ALIASES.get(tag, tag)
