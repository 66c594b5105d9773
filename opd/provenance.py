"""Teacher licences and the student's provenance record.

Distilling copies behaviour from a teacher into a student, so a teacher's terms can reach the
student: some forbid training other models on its outputs, others let it happen but require
notices, names or use restrictions to travel with the result. This module (1) refuses, before any
worker starts, a teacher whose licence restricts training unless someone recorded why this use is
allowed, and (2) writes `provenance.json` + `DISTILLATION.md` next to the saved student so what it
was made from, and what it owes, stays with it.

The licence table is a summary to route attention, not legal advice: every notice says to check the
licence text. Only the stdlib is imported here (config validation must stay sub-second, and
opd.config imports this module).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opd.config import OPDConfig, TeacherConfig

FORMAT_VERSION = 1
MISSING = "missing"
_BUILTIN = "builtin:"  # same prefix as opd.config.BUILTIN; not imported to avoid an import cycle


@dataclass(frozen=True)
class Licence:
    """What the licence gate and the model card need to know about one licence."""

    id: str
    name: str
    restricts_training: bool
    """True when the terms forbid (or typically forbid) using the model or its outputs to improve other models."""
    notice: str | None
    """Obligations that travel with a student trained on this teacher (None: nothing beyond the usual)."""
    url: str


_CHECK = "Check the licence text."


def _llama_notice(version: str, eu_multimodal: bool = False) -> str:
    """Llama 3.1+ terms: distillation is allowed, with naming, attribution and policy duties."""
    eu = (
        " Its Acceptable Use Policy withholds the licence for the multimodal models from individuals and companies"
        " based in the EU."
        if eu_multimodal
        else ""
    )
    return (
        f"Llama {version} Community License: a distributed model trained with Llama {version} or its outputs must have "
        'a name beginning with "Llama" and prominently display "Built with Llama"; ship a copy of the licence and '
        "follow the Llama Acceptable Use Policy; licensees above 700 million monthly active users need a separate "
        f"licence from Meta.{eu} {_CHECK}"
    )


def _llama(version: str, slug: str, eu_multimodal: bool = False) -> Licence:
    return Licence(
        id=f"llama{version}",
        name=f"Llama {version} Community License Agreement",
        restricts_training=False,
        notice=_llama_notice(version, eu_multimodal),
        url=f"https://www.llama.com/{slug}/license/",
    )


_TABLE = [
    Licence("apache-2.0", "Apache License 2.0", False, None, "https://www.apache.org/licenses/LICENSE-2.0"),
    Licence("mit", "MIT License", False, None, "https://opensource.org/license/mit"),
    Licence(
        "bsd-3-clause",
        'BSD 3-Clause "New" or "Revised" License',
        False,
        None,
        "https://opensource.org/license/bsd-3-clause",
    ),
    Licence(
        "cc-by-4.0",
        "Creative Commons Attribution 4.0 International",
        False,
        f"CC BY 4.0: if the student counts as Adapted Material, credit the teacher's creators and link the licence. "
        f"{_CHECK}",
        "https://creativecommons.org/licenses/by/4.0/",
    ),
    Licence(
        "cc-by-nc-4.0",
        "Creative Commons Attribution-NonCommercial 4.0 International",
        False,
        "CC BY-NC 4.0: non-commercial use only; if the student counts as Adapted Material it may only be used and "
        f"shared non-commercially, with attribution. {_CHECK}",
        "https://creativecommons.org/licenses/by-nc/4.0/",
    ),
    Licence(
        "openrail",
        "Open RAIL licence",
        False,
        "OpenRAIL: RAIL licences count models trained on the model's outputs (distillation) as derivatives and "
        f"require their use-based restrictions to be passed on with them. {_CHECK}",
        "https://huggingface.co/blog/open_rail",
    ),
    Licence(
        "bigscience-openrail-m",
        "BigScience OpenRAIL-M License",
        False,
        "BigScience OpenRAIL-M: a model distilled from the model's outputs is a Derivative of the Model; the use-based "
        f"restrictions (Attachment A) and a copy of the licence must go with it. {_CHECK}",
        "https://bigscience.huggingface.co/blog/bigscience-openrail-m",
    ),
    Licence(
        "llama2",
        "Llama 2 Community License Agreement",
        True,
        "Llama 2 Community License: Llama 2 and its outputs may not be used to improve any other large language model "
        "except Llama 2 and its derivative works; distribution needs a copy of the licence and the attribution notice, "
        f"and use must follow the Llama 2 Acceptable Use Policy. {_CHECK}",
        "https://www.llama.com/llama2/license/",
    ),
    Licence(
        # Only from 3.1 on did Meta allow outputs to improve other models; the 3.0 licence keeps the Llama 2 clause.
        "llama3",
        "Meta Llama 3 Community License Agreement",
        True,
        "Meta Llama 3 Community License: Llama 3 and its outputs may not be used to improve any other large language "
        "model except Meta Llama 3 and its derivatives; a distributed model built with it must have a name beginning "
        'with "Llama 3", display "Built with Meta Llama 3", ship a copy of the licence and follow the Acceptable Use '
        f"Policy. {_CHECK}",
        "https://www.llama.com/llama3/license/",
    ),
    _llama("3.1", "llama3_1"),
    _llama("3.2", "llama3_2", eu_multimodal=True),
    _llama("3.3", "llama3_3"),
    _llama("4", "llama4", eu_multimodal=True),
    Licence(
        "gemma",
        "Gemma Terms of Use",
        False,
        "Gemma Terms of Use: a model trained on Gemma's outputs (distillation) is a Model Derivative; distributing it "
        "requires passing on the use restrictions (incl. the Gemma Prohibited Use Policy) as an enforceable provision, "
        'a copy of the terms, and a Notice file reading "Gemma is provided under and subject to the Gemma Terms of Use '
        f'found at ai.google.dev/gemma/terms". {_CHECK}',
        "https://ai.google.dev/gemma/terms",
    ),
    Licence(
        "qwen",
        "Qwen License Agreement",
        False,
        'Qwen License Agreement: a distributed model trained or improved with Qwen or its outputs must display "Built '
        'with Qwen" or "Improved using Qwen" in its documentation; commercial use above 100 million monthly active '
        f"users needs a licence from Alibaba Cloud. {_CHECK}",
        "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
    ),
    Licence(
        # The 2023 licence (Qwen, Qwen1.5, Qwen2-72B) has the Llama 2 style clause; check which one a model ships.
        "tongyi-qianwen",
        "Tongyi Qianwen License Agreement",
        True,
        "Tongyi Qianwen License Agreement: the Materials and their outputs may not be used to improve any other large "
        "language model except Tongyi Qianwen and its derivative works; commercial use above 100 million monthly "
        f"active users needs a licence from Alibaba Cloud. {_CHECK}",
        "https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20LICENSE%20AGREEMENT",
    ),
    Licence(
        "qwen-research",
        "Qwen Research License Agreement",
        False,
        "Qwen Research License: non-commercial (research and evaluation) use only; a distributed model trained or "
        f'improved with it must display "Built with Qwen" or "Improved using Qwen". {_CHECK}',
        "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE",
    ),
    Licence(
        "deepseek",
        "DeepSeek License Agreement",
        False,
        "DeepSeek License Agreement: models distilled from the model's outputs count as Derivatives of the Model; the "
        f"use-based restrictions (Attachment A) must be passed on with them, with a copy of the licence. {_CHECK}",
        "https://github.com/deepseek-ai/DeepSeek-LLM/blob/main/LICENSE-MODEL",
    ),
    Licence(
        "proprietary-api",
        "Proprietary API terms of service",
        True,
        "Trained with outputs of a proprietary API: the provider's terms of service govern that use and commonly "
        "forbid developing competing models; check the provider's terms.",
        "",
    ),
    Licence("unspecified", "Unspecified (not checked)", False, None, ""),
]

LICENCES: dict[str, Licence] = {lic.id: lic for lic in _TABLE}
"""Known licences by lowercase id (Hugging Face `license:` tags where one exists)."""


def normalise_id(licence_id: str) -> str:
    return licence_id.strip().lower()


def lookup(licence_id: str) -> Licence | None:
    """The table entry for an id (case-insensitive), or None when the id is not in the table."""
    return LICENCES.get(normalise_id(licence_id))


def _builtin(model: str) -> bool:
    """Built-in models are initialised here from random weights, so no third party's terms apply."""
    return model.startswith(_BUILTIN)


def licence_problems(teachers: Iterable[TeacherConfig]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the licence gate; errors refuse the run, warnings are printed and go on.

    A teacher whose licence restricts training is refused unless `accept_terms` says why this use is allowed
    (a written agreement, the student being a derivative the licence exempts, ...); that text is recorded.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for i, t in enumerate(teachers):
        lid = normalise_id(t.license)
        lic = LICENCES.get(lid)
        key = f"teachers.{i}.license={t.license}"
        if lic is None:
            warnings.append(
                f"{key} is not in opd's licence table (opd/provenance.py), so it is treated as unspecified: check that "
                f"the terms of {t.model} allow training another model on its outputs"
            )
        elif lic.id == "unspecified":
            if not _builtin(t.model):
                warnings.append(
                    f"teachers.{i}.license is unspecified: nobody has recorded whether the terms of {t.model} allow "
                    f"training another model on its outputs; set teachers.{i}.license to its licence id "
                    f"(e.g. apache-2.0, llama3.1, gemma)"
                )
        elif lic.restricts_training:
            why = f"{lic.name} restricts using {t.model} or its outputs to train other models"
            if not t.accept_terms.strip():
                errors.append(
                    f"{key}: {why}. If this use is allowed (a written agreement, or the student is a derivative the "
                    f'licence exempts), set teachers.{i}.accept_terms="<why you may>" to proceed; it is recorded in '
                    "the student's provenance.json"
                )
            else:
                warnings.append(
                    f"{key}: {why}; proceeding under teachers.{i}.accept_terms={t.accept_terms!r} "
                    "(recorded in provenance.json)"
                )
    return errors, warnings


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB data files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _normalised_shares(names: list[str], signal_share: Mapping[str, float]) -> dict[str, float]:
    """Each teacher's fraction of the training signal; raw counts or weights are scaled to sum to 1."""
    raw = {name: max(float(signal_share.get(name, 0.0)), 0.0) for name in names}
    total = sum(raw.values())
    return {name: (v / total if total > 0 else 0.0) for name, v in raw.items()}


def _opd_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("opd")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_provenance(
    cfg: OPDConfig,
    *,
    student_path: str,
    student_base: str,
    teacher_paths: Mapping[str, str],
    signal_share: Mapping[str, float],
    data_files: Mapping[str, str],
    started: str,
    finished: str,
    opd_version: str | None = None,
) -> dict[str, Any]:
    """Everything needed to say what the student was made from and what it owes, as plain JSON data.

    teacher_paths maps teacher name -> resolved checkpoint (default: its `model`); signal_share maps teacher
    name -> its share of the training signal (any non-negative scale); data_files maps a role ("train",
    "eval") -> path, hashed here (a file that is not there is recorded as "missing").
    """
    from opd.config import to_dict  # here, not at the top: opd.config imports this module

    names = [t.name for t in cfg.teachers]
    shares = _normalised_shares(names, signal_share)
    teachers = []
    notices: list[str] = []
    for t in cfg.teachers:
        lic = lookup(t.license)
        if lic is not None and lic.notice and lic.notice not in notices:
            notices.append(lic.notice)
        teachers.append(
            {
                "name": t.name,
                "model": t.model,
                "path": teacher_paths.get(t.name, t.model),
                "backend": t.backend,
                "weight": t.weight,
                "licence": {
                    "id": normalise_id(t.license),
                    "name": lic.name if lic else "not in opd's licence table",
                    "url": lic.url if lic else "",
                    "known": lic is not None,
                    "restricts_training": lic.restricts_training if lic else None,
                },
                "source": t.source,
                "accept_terms": t.accept_terms,
                "signal_share": shares[t.name],
            }
        )
    data = {}
    for role, path in data_files.items():
        data[role] = {"path": str(path), "sha256": file_sha256(path) if Path(path).is_file() else MISSING}
    return {
        "format": FORMAT_VERSION,
        "opd_version": opd_version or _opd_version(),
        "student": {"base": student_base, "path": student_path},
        "teachers": teachers,
        "data": data,
        "dates": {"started": started, "finished": finished},
        "notices": notices,
        "config": to_dict(cfg),
    }


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a half-written card."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _cell(value: object) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ") or "-"


_OBJECTIVES = {
    "reverse_kl": "on-policy reverse KL: the student samples, the teacher's log-probs score every token",
    "jsd": "generalised Jensen-Shannon divergence between student and teacher (beta={beta})",
    "topk_kl": "KL divergence over the teacher's top-{top_k} tokens",
    "sft": "cross-entropy on teacher-written samples",
}


def _objective(config: Mapping[str, Any]) -> list[str]:
    loss = config.get("loss") or {}
    kind = loss.get("type", "?")
    summary = _OBJECTIVES.get(kind, kind)
    with contextlib.suppress(KeyError, IndexError, ValueError):
        summary = summary.format(**loss)
    lines = [f"- Loss: `{kind}`: {summary}."]
    if loss:
        lines.append("- Loss settings: " + ", ".join(f"`{k}={v}`" for k, v in loss.items()))
    if "mode" in config:
        lines.append(f"- Mode: `{config['mode']}`")
    combine = config.get("combine") or {}
    if len(config.get("teachers") or []) > 1 and "rule" in combine:
        lines.append(f"- Teachers combined by: `{combine['rule']}`")
    if "rounds" in config:
        lines.append(f"- Rounds: {config['rounds']}")
    return lines


def model_card(provenance: Mapping[str, Any]) -> str:
    """The human-readable DISTILLATION.md for a provenance record."""
    student = provenance.get("student", {})
    teachers = provenance.get("teachers", [])
    title = Path(student.get("path") or "student").name or "student"
    out = [
        f"# Distillation card: {title}",
        "",
        "This model was trained by on-policy distillation with opd "
        f"{provenance.get('opd_version', 'unknown')}. The full record, including the run's configuration, is in "
        "`provenance.json` next to this file.",
        "",
        f"- Student base model: `{student.get('base', '?')}`",
        f"- Saved to: `{student.get('path', '?')}`",
        "",
        "## Teachers",
        "",
        "| Teacher | Model | Licence | Source | Share of training signal |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in teachers:
        lic = t.get("licence", {})
        licence = f"{lic.get('name', '?')} (`{lic.get('id', '?')}`)"
        if lic.get("url"):
            licence = f"[{licence}]({lic['url']})"
        share = t.get("signal_share", 0.0)
        out.append(
            f"| {_cell(t.get('name'))} | `{_cell(t.get('path') or t.get('model'))}` | {_cell(licence)} | "
            f"{_cell(t.get('source'))} | {share:.1%} |"
        )
    out += ["", "## Objective", "", *_objective(provenance.get("config") or {}), "", "## Data", ""]
    data = provenance.get("data") or {}
    if data:
        out += ["| Role | File | SHA-256 |", "| --- | --- | --- |"]
        out += [f"| {_cell(r)} | `{_cell(d.get('path'))}` | `{_cell(d.get('sha256'))}` |" for r, d in data.items()]
    else:
        out.append("No data files were recorded.")
    dates = provenance.get("dates") or {}
    out += ["", "## Dates", "", f"- Started: {dates.get('started', '?')}", f"- Finished: {dates.get('finished', '?')}"]
    out += ["", "## Licence notices", ""]
    notices = provenance.get("notices") or []
    out += [f"- {n}" for n in notices] or ["No teacher licence in opd's table requires a notice."]
    unchecked = [
        t for t in teachers if not t.get("licence", {}).get("known") or t["licence"].get("id") == "unspecified"
    ]
    for t in unchecked:
        if not _builtin(str(t.get("model", ""))):
            out.append(
                f"- The licence of teacher {t.get('name')} (`{t.get('licence', {}).get('id')}`) was not checked by "
                "opd: check its terms before distributing this model."
            )
    accepted = [t for t in teachers if t.get("accept_terms")]
    if accepted:
        out += ["", "## Teachers used under accepted terms", ""]
        for t in accepted:
            lic = t.get("licence", {})
            restricted = " (a licence that restricts training other models)" if lic.get("restricts_training") else ""
            out.append(f"- {t.get('name')}: {lic.get('name', '?')}{restricted}. Why this use is allowed, as recorded:")
            out.append(f"  > {str(t['accept_terms']).replace(chr(10), ' ')}")
    out.append("")
    return "\n".join(out)


def write_model_card(directory: str | os.PathLike[str], provenance: Mapping[str, Any]) -> None:
    """Write provenance.json and DISTILLATION.md into the student's directory, each atomically."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "provenance.json", json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(root / "DISTILLATION.md", model_card(provenance))


__all__ = [
    "LICENCES",
    "Licence",
    "build_provenance",
    "file_sha256",
    "licence_problems",
    "lookup",
    "model_card",
    "write_model_card",
]
