"""Readers: a data file (or folder) -> its rows, each with the `file:line` it came from.

One reader per file kind, chosen by `file_kind` from the path: JSON lines (`.jsonl`, `.jsonl.gz`, and any name
not listed), JSON (`.json`, a list of rows), Parquet (`.parquet`), tab-separated text without a header (`.tsv`,
`.txt`: the last field is the text, the others are kept as `fields`), or a folder written by
`datasets.Dataset.save_to_disk`. A row that cannot be parsed is yielded as a `DataError` in its place, so that the
caller decides whether to raise or skip; what rows mean is `formats.py`'s business.

Adding a file kind: write a reader `(path) -> Iterator[(where, row)]`, add it to `READERS` under the name
`file_kind` gives it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dpokit.data.report import DataError
from dpokit.hub import HubDataset, iter_hub_rows

Rows = Iterator[tuple[str, Any]]
"""(`file:line`, row) pairs; the row is a `DataError` where the line could not be read."""
Reader = Callable[[Path], Rows]

# bytes.strip()'s whitespace: a JSON line holding only these is blank (other Unicode spaces are a JSON error).
ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


def _numbered(path: Path, rows: Iterable[Any]) -> Rows:
    for i, row in enumerate(rows):
        yield f"{path}:{i + 1}", row


def _lines(path: Path, opener: Callable[..., BinaryIO]) -> Iterator[tuple[str, str | DataError]]:
    """Each line decoded as UTF-8, or the error naming its first bad byte."""
    with opener(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
            try:
                yield where, raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a byte-order mark is not content
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: bytes that are not UTF-8 at offset {e.start}", "not_utf8")


def read_jsonl(path: Path) -> Rows:
    """One JSON value per line; gzip-compressed when the name ends in `.gz`. Blank lines are not rows."""
    opener: Callable[..., BinaryIO] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
    for where, line in _lines(path, opener):
        if isinstance(line, DataError):
            yield where, line
            continue
        if not line.strip(ASCII_WHITESPACE):
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", "invalid_json")
        except RecursionError:
            yield where, DataError(f"{where}: invalid JSON: nested too deeply", "invalid_json")


def read_json(path: Path) -> Rows:
    """A whole file holding one JSON list of rows."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        lines = " (one JSON value per line? name the file .jsonl)" if "Extra data" in str(e) else ""
        raise DataError(f"{path}: not valid JSON: {e}{lines}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows (use .jsonl for one row per line)")
    yield from _numbered(path, data)


def read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    yield from _numbered(path, pq.read_table(path).to_pylist())


def read_tsv(path: Path) -> Rows:
    """Tab-separated text without a header: the last field is the text, the others are kept as `fields`."""
    for where, line in _lines(path, open):
        if isinstance(line, DataError):
            yield where, line
            continue
        line = line.rstrip("\r\n")
        if line.strip():
            *fields, text = line.split("\t")
            yield where, {"text": text, "fields": fields}


def read_saved_dataset(path: Path) -> Rows:
    """A folder written by `datasets.Dataset.save_to_disk` (one split)."""
    import datasets

    table = datasets.load_from_disk(str(path))
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict folder; point data.train_path at one split's folder")
    yield from _numbered(path, table)


READERS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "parquet": read_parquet,
    "tsv": read_tsv,
    "saved_dataset": read_saved_dataset,
}
"""The reader of each file kind (the names `file_kind` gives)."""

SUFFIX_KINDS = {".json": "json", ".parquet": "parquet", ".tsv": "tsv", ".txt": "tsv"}
UNSUPPORTED = frozenset({".csv", ".xlsx", ".xls", ".arrow", ".zip", ".tar", ".bz2", ".xz", ".zst", ".pkl", ".pt"})
"""Suffixes of files that are not data in a form dpokit reads (read as JSON lines, each would fail line by line)."""
"""File kinds named by the last suffix; any other name (`.jsonl`, `.gz`, none) is read as JSON lines."""


def file_kind(path: Path) -> str:
    """The name of the reader for `path`, which must exist. (A source that is not a local path, such as a Hub
    dataset id, would be recognised here, before the existence check, and given a reader of its own.)"""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return "saved_dataset"
    if path.suffix.lower() in UNSUPPORTED:
        raise DataError(
            f"{path}: {path.suffix} files are not read; convert it to JSON lines (.jsonl, .jsonl.gz), JSON or Parquet"
        )
    return SUFFIX_KINDS.get(path.suffix, "jsonl")


def iter_rows(path: str | Path | HubDataset) -> Rows:
    """Yield (`file:line`, row) for every row of a data file or `save_to_disk` folder, or (`id[split]:row`, row) for
    a split of a Hub data set. A row that cannot be parsed is yielded as a `DataError` so that the caller decides
    whether to raise or skip."""
    if isinstance(path, HubDataset):  # prepare.data_source decided: not a local path, a Hub id
        yield from iter_hub_rows(path)
        return
    path = Path(path)
    kind = file_kind(path)
    try:
        yield from READERS[kind](path)
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as e:  # damaged files: gzip, zlib, pyarrow (ArrowInvalid is a ValueError)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: {_damaged(path, kind)} ({first}); {WHAT_TO_DO[kind]}", "unreadable_file") from e


WHAT_TO_DO = {
    "jsonl": "check the file (download or compress it again)",
    "json": "check the file",
    "parquet": "write or download it again",
    "tsv": "check the file",
    "saved_dataset": "give a folder written by datasets' save_to_disk (one split), copied completely",
}


def _damaged(path: Path, kind: str) -> str:
    if kind == "saved_dataset":
        return "a folder that is not a readable `datasets` save_to_disk folder"
    if kind == "jsonl" and path.suffix == ".gz":
        return "not a readable gzip file: truncated, damaged, or not gzip-compressed"
    return f"not a readable {'Parquet' if kind == 'parquet' else 'data'} file: truncated or damaged"
