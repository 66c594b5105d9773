"""The student's provenance record: `provenance.json` + `DISTILLATION.md` next to the saved student.

Distilling copies behaviour, and sometimes obligations, from teachers into a student (opd/licenses.py has
the licence table and the gate that ran when the config was validated). What the student was made from,
and what its teachers' licences say it owes, is written beside it so it stays with it. No torch, Ray or
vLLM is imported here: a record can be read and written anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.catalog import from_scratch
from opd.config import OPDConfig, to_dict
from opd.learner.loss_types import LOSS_TYPES
from opd.licenses import lookup, normalise_id
from opd.secrets import safe_config, without_userinfo

FORMAT_VERSION = 1
MISSING = "missing"


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB data files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """`file_sha256` once per file version: a run writing a student every few rounds hashes its data once."""
    return file_sha256(path)


def _data_sha256(path: str) -> str:
    if not Path(path).is_file():
        return MISSING
    stat = os.stat(path)
    return _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)


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
                **({"endpoint": without_userinfo(t.url)} if t.backend == "openai" else {}),
                "backend": t.backend,
                "weight": t.weight,
                "license": {
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
        data[role] = {"path": str(path), "sha256": _data_sha256(path)}
    return {
        "format": FORMAT_VERSION,
        "opd_version": opd_version or _opd_version(),
        "student": {"base": student_base, "path": student_path},
        "teachers": teachers,
        "data": data,
        "dates": {"started": started, "finished": finished},
        "notices": notices,
        "config": safe_config(cfg),
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


def _objective(config: Mapping[str, Any]) -> list[str]:
    loss = config.get("loss") or {}
    kind = loss.get("type", "?")
    summary = LOSS_TYPES.get(kind).description if kind in LOSS_TYPES else kind
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
        lic = t.get("license", {})
        named = f"{lic.get('name', '?')} (`{lic.get('id', '?')}`)"
        if lic.get("url"):
            named = f"[{named}]({lic['url']})"
        share = t.get("signal_share", 0.0)
        out.append(
            f"| {_cell(t.get('name'))} | `{_cell(t.get('path') or t.get('model'))}` | {_cell(named)} | "
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
        t for t in teachers if not t.get("license", {}).get("known") or t["license"].get("id") == "unspecified"
    ]
    for t in unchecked:
        if not from_scratch(str(t.get("model", ""))):  # made here from random weights: nobody's terms
            out.append(
                f"- The licence of teacher {t.get('name')} (`{t.get('license', {}).get('id')}`) was not checked by "
                "opd: check its terms before distributing this model."
            )
    accepted = [t for t in teachers if t.get("accept_terms")]
    if accepted:
        out += ["", "## Teachers used under accepted terms", ""]
        for t in accepted:
            lic = t.get("license", {})
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


@dataclass
class StudentCard:
    """Writes provenance.json + DISTILLATION.md into a saved student directory: the final student's and each
    `checkpoint.export_every` export's. What the record needs is fixed when the run starts, except each teacher's
    share of the signal so far, which the controller passes with each directory."""

    cfg: OPDConfig
    student_base: str
    """The resolved path the student started from."""
    teacher_paths: Mapping[str, str]
    data_files: Mapping[str, str]
    started: str

    def inputs(self) -> dict:
        """The config keys and prompt-file hashes a resumed run must share with its checkpoint
        (`opd.checkpoint.fingerprint`); the files are hashed once per version."""
        from opd.checkpoint import fingerprint

        roles = {role: path for role, path in self.data_files.items() if role == "train"}
        return fingerprint(to_dict(self.cfg), {role: _data_sha256(path) for role, path in roles.items()})

    def __call__(self, path: str, signal_share: Mapping[str, float], into: str | None = None) -> None:
        """The record of the student at `path`, written into `into` (default `path`): an export is written beside
        its final place and renamed there, and its record names where it ends up."""
        record = build_provenance(
            self.cfg,
            student_path=path,
            student_base=self.student_base,
            teacher_paths=self.teacher_paths,
            signal_share=signal_share,
            data_files=self.data_files,
            started=self.started,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_model_card(into or path, record)


__all__ = ["StudentCard", "build_provenance", "file_sha256", "model_card", "write_model_card"]
