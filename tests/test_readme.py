"""README.md's `python launch.py` commands are valid: each one, run with `--dry-run`, exits 0.

`--dry-run` parses and checks the config (keys, types, combinations, local paths) and prints the plan without
starting Ray, so each command costs about a second. docs/losses.md and docs/architecture.md name only config keys
that exist (tests/test_config.py checks README.md and bench/README.md).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opd.config import OPDConfig
from tests.test_config import documented_keys, in_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIX = "python launch.py"


def fenced_lines(text: str) -> list[str]:
    """The lines inside ``` fences, backslash continuations joined into one line each."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def launch_commands(text: str) -> list[str]:
    return [line for line in fenced_lines(text) if line.startswith(PREFIX)]


def dry_run_argv(command: str) -> list[str]:
    """The command's arguments (a trailing `# comment` dropped) with `--dry-run` put first."""
    args = shlex.split(command, comments=True)
    assert args[:2] == ["python", "launch.py"], command
    return [sys.executable, "launch.py", "--dry-run", *args[2:]]


COMMANDS = launch_commands(README.read_text())


def test_the_readme_has_launch_commands_to_check():
    assert len(COMMANDS) >= 5, COMMANDS
    assert fenced_lines("```\npython launch.py a=1 \\\n  b=2  # c\n```\n") == ["python launch.py a=1 b=2  # c"]
    assert dry_run_argv("python launch.py a=1 'b={x: 1}'  # c")[2:] == ["--dry-run", "a=1", "b={x: 1}"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_launch_command_passes_dry_run(command):
    proc = subprocess.run(dry_run_argv(command), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"^plan \(", proc.stdout, re.M), proc.stdout[-2000:]


# docs/config.md is generated from the schema (and names TRL's and verl's keys on purpose); its own test checks it.
@pytest.mark.parametrize("path", [ROOT / "docs/losses.md", ROOT / "docs/architecture.md"], ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(path):
    schema = OmegaConf.structured(OPDConfig)
    keys = documented_keys(path.read_text(), set(schema.keys()))
    missing = sorted(k for k in keys if not in_schema(schema, k))
    assert not missing, f"{path.name} names config keys the schema lacks: {missing}"
