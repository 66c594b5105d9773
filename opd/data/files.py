"""Reading a prompt file's rows: JSONL, a JSON array, Parquet, or a `datasets.save_to_disk` directory.

Each row comes with its 1-based position so every later error can name it: `file:line` for JSONL (the physical
line, blank lines counted), `file row N` for the other formats. A row that cannot be read at all (bad bytes, bad
JSON) comes as `Unreadable`, to be skipped or refused like any other bad row; a file that cannot be read at all
is a `DataError`. Parquet and `datasets` are imported only for their own formats.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = ".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk (PATH:SPLIT for a DatasetDict)"
BATCH_ROWS = 1024
"""Rows converted to Python objects at a time from Parquet and Arrow (a whole table at once would double memory)."""
MAX_ROW_BYTES = 16 * 2**20
"""The longest JSONL line (bytes) and the longest prompt of the other formats (characters). Far above any real
prompt; what is longer is a file that is not one JSON object per line (e.g. a JSON array on one line), and reading
it whole could take all the driver's memory, so a line is read at most this much at a time."""


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Unreadable:
    """A row that is not a value at all; `reason` says why (e.g. malformed JSON)."""

    reason: str


@dataclass(frozen=True)
class Rows:
    """A file's rows as (1-based position, value or `Unreadable`), and how to name a position in messages."""

    source: str
    """The file as given (`PATH` or `PATH:SPLIT`)."""
    unit: str
    """"line" (JSONL) or "row"."""
    items: Iterator[tuple[int, object]]

    def where(self, n: int) -> str:
        return f"{self.source}:{n}" if self.unit == "line" else f"{self.source} row {n}"


def split_source(source: str) -> tuple[Path, str | None]:
    """`PATH` or `PATH:SPLIT` (a split of a saved DatasetDict) -> (path, split or None)."""
    path = Path(source)
    if not path.exists() and ":" in source:
        head, split = source.rsplit(":", 1)
        if Path(head).is_dir():
            return Path(head), split
    return path, None


def _saved_splits(path: Path) -> list[str] | None:
    """The splits of a saved DatasetDict directory, or None when it is not one."""
    index = path / "dataset_dict.json"
    return json.loads(index.read_text())["splits"] if index.is_file() else None


NO_SUCH_FILE = "no such file or directory"


def source_problem(source: str) -> str | None:
    """Why `source` cannot be a prompt file (without reading its rows), or None. Cheap: no pyarrow or datasets."""
    path, split = split_source(source)
    if not path.exists():
        return NO_SUCH_FILE
    if path.is_dir():
        splits = _saved_splits(path)
        if splits is None:
            if not (path / "dataset_info.json").is_file():
                saved = "no dataset_info.json or dataset_dict.json"
                return f"not a saved datasets Dataset or DatasetDict ({saved}); expected {FORMATS}"
            if split is not None:
                return f"is a Dataset with no splits; drop `:{split}`"
        elif split is None:
            return f"is a DatasetDict with splits {', '.join(splits)}; name one as {source}:SPLIT"
        elif split not in splits:
            return f"the DatasetDict has no split {split!r} (splits: {', '.join(splits)})"
        return None
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        return f"unsupported file type {path.suffix or '(no suffix)'!r}; expected {FORMATS}"
    return None


def read_rows(source: str) -> Rows:
    """The rows of a prompt file; a `DataError` naming the file when it cannot be read at all."""
    problem = source_problem(source)
    if problem:
        raise DataError(f"{source}: {problem}")
    path, split = split_source(source)
    if path.is_dir():
        return Rows(source, "row", _dataset_rows(path, split))
    if path.suffix == ".parquet":
        return Rows(source, "row", _parquet_rows(path, source))
    if path.suffix == ".json":
        return Rows(source, "row", enumerate(_json_array(path, source), start=1))
    return Rows(source, "line", _jsonl_rows(path))


def _decode_line(raw: bytes) -> object:
    """A JSONL line's value, or why it has none."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return Unreadable("UTF-16 text (byte-order mark); save the file as UTF-8")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Unreadable(f"not UTF-8 ({err.reason} at byte {err.start})")
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return Unreadable(f"malformed JSON ({err.msg})")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Blank lines are not rows; a UTF-8 byte-order mark on the first line and Windows line endings are accepted.

    A line longer than `MAX_ROW_BYTES` is `Unreadable`, and read past in pieces of that size, never whole.
    """
    limit = MAX_ROW_BYTES
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(limit + 1):
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                while (rest := f.readline(limit)) and not rest.endswith(b"\n"):
                    pass
                yield lineno, Unreadable(f"the line is over {limit:,} bytes; is the file one JSON object per line?")
                continue
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield lineno, _decode_line(raw.rstrip(b"\r\n"))


def _json_array(path: Path, source: str) -> list:
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{source}: UTF-16 text (byte-order mark); save the file as UTF-8")
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        hint = "; one JSON object per line is JSON Lines: name the file .jsonl" if err.msg == "Extra data" else ""
        raise DataError(f"{source}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno}){hint}") from None
    if not isinstance(value, list):
        raise DataError(f"{source}: a .json prompt file holds a JSON array of row objects (got {json_type(value)})")
    return value


def _parquet_rows(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except pa.ArrowException as err:
        raise DataError(f"{source}: not a readable Parquet file ({err})") from None


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[int, dict]]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if split is not None:
        data = data[split]
    n = 0
    for batch in data.iter(batch_size=BATCH_ROWS):
        for values in zip(*batch.values(), strict=True):
            n += 1
            yield n, dict(zip(batch.keys(), values, strict=True))


def json_type(value) -> str:
    """The JSON name of a value's type, for messages (a Parquet or Arrow value outside JSON keeps its own name)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
