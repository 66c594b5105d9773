"""docs/config.md, the configuration reference, generated from the schema: every key with its type, default and
the first sentence of its docstring, grouped by section, then the TRL / verl names of opd's keys.

    python -m opd.config.reference > docs/config.md

A field's docstring is the string literal right after it in the dataclass (read here with `ast`, as Python keeps
no such attribute docstrings); tests/test_config_reference.py fails when docs/config.md is not what this writes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from opd.config.aliases import ALIASES
from opd.config.schema import OPDConfig

COMMAND = "python -m opd.config.reference > docs/config.md"
LIST_INDEX = "N"
"""How a list's index is written in a key: `teachers.N.model` (in an override, `teachers.0.model`)."""


@dataclass(frozen=True)
class Key:
    path: str
    """Dotted, e.g. rollout.engine.max_model_len."""
    type: str
    default: str
    doc: str
    """The whole docstring, whitespace collapsed ("" when there is none)."""


@dataclass(frozen=True)
class Section:
    path: str
    """Dotted prefix of its keys; "" for the top level."""
    doc: str
    keys: tuple[Key, ...]


@cache
def _class_nodes(module: str) -> dict[str, ast.ClassDef]:
    source = Path(sys.modules[module].__file__).read_text()
    return {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right after it), for the fields of dataclass `cls` that
    have one."""
    body = _class_nodes(cls.__module__)[cls.__name__].body
    docs = {}
    for node, after in pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _nested(tp: Any) -> tuple[type | None, bool]:
    """(the dataclass a field holds, whether it is a list of them), or (None, False) for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(arg := typing.get_args(tp)[0]):
        return arg, True
    return None, False


def sections(cls: type = OPDConfig, path: str = "", doc: str = "") -> list[Section]:
    """`cls`'s own keys as one section, then each nested section's, depth first, in schema order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        sub, is_list = _nested(hints[f.name])
        key = f"{path}{f.name}"
        if sub is not None:
            nested.append((sub, f"{key}.{LIST_INDEX}." if is_list else f"{key}.", docs.get(f.name, "")))
        else:
            keys.append(Key(key, type_name(hints[f.name]), default_text(f), docs.get(f.name, "")))
    out = [Section(path.rstrip("."), doc, tuple(keys))] if keys else []
    for sub, sub_path, sub_doc in nested:
        out += sections(sub, sub_path, sub_doc)
    return out


def keys() -> list[Key]:
    """Every key of the schema, sections included as keys of their own (with type `section`)."""
    out = []
    for s in sections():
        if s.path:
            out.append(Key(s.path, "section", "", s.doc))
        out += s.keys
    return out


def is_key(path: str) -> bool:
    """Whether `path` names a key or section of the schema; list indices may be numbers (teachers.0.model)."""
    path = re.sub(r"\.\d+(?=\.|$)", f".{LIST_INDEX}", path)
    return any(k.path == path for k in keys())


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(v) for v in typing.get_args(tp))
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        return " | ".join([*(type_name(a) for a in args if a is not type(None)), "null"])
    if typing.get_origin(tp) in (list, dict):
        return f"{typing.get_origin(tp).__name__}[{', '.join(type_name(a) for a in args)}]"
    return "any" if tp is Any else tp.__name__


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return value_text(value)


def value_text(value: Any) -> str:
    """A default as it is written in YAML or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):  # quoted when empty or when whitespace would be lost
        return value if value and value == " ".join(value.split()) else json.dumps(value)
    if isinstance(value, list):
        return f"[{', '.join(value_text(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+(?=[A-Z0-9`(\"])")


def first_sentence(doc: str) -> str:
    return _SENTENCE_END.split(doc, maxsplit=1)[0] if doc else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def key_table(section: Section) -> list[str]:
    rows = ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for k in section.keys:
        rows.append(f"| `{k.path}` | {_cell(k.type)} | {_code(k.default)} | {_cell(first_sentence(k.doc))} |")
    return rows


def alias_table(source: str) -> list[str]:
    rows = [f"| {source} | opd | Note |", "| --- | --- | --- |"]
    for name, alias in ALIASES.items():
        if alias.source == source:
            rows.append(f"| `{name}` | `{alias.key}` | {_cell(alias.note)} |")
    return rows


HEADER = f"""# Configuration reference

<!-- Generated from the schema in opd/config/ by `{COMMAND}`: edit the docstrings there, not this file. -->

Every key of a run's config, with its type, its default and the first sentence of its docstring (the rest is in
opd/config/). Set a key in a YAML file under conf/ or on the command line, `python launch.py learner.lr=3e-5
teachers.0.model=org/name`; `python launch.py --dry-run ...` prints the config a run would use. A list's index is
`N` here: `teachers.0.model` is the first teacher's model. Coming from TRL or verl? See [the last
section](#trl-and-verl-names).

Regenerate this file after changing the schema: `{COMMAND}` (tests/test_config_reference.py checks it).
"""

ALIAS_INTRO = """## TRL and verl names

opd's keys for TRL's and verl's settings that mean the same, or nearly (the note says how they differ). Given one
of these names as a key, opd's error names its key. The table is `ALIASES` in opd/config/aliases.py.
"""


def render() -> str:
    lines = [HEADER]
    for s in sections():
        title = f"`{s.path}`" if s.path else "Top level"
        depth = "###" if s.path.replace(f".{LIST_INDEX}", "").count(".") else "##"
        lines.append(f"{depth} {title}\n")
        if s.doc:
            lines.append(f"{s.doc}\n")
        lines += [*key_table(s), ""]
    lines.append(ALIAS_INTRO)
    for source in ("TRL", "verl"):
        lines += [*alias_table(source), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
