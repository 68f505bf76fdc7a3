"""Reading import sources: which format a source is, its content digest, and its rows.

A source is a JSONL, Parquet or CSV file, a folder of files of one of those formats, or a dataset
saved with ``datasets``' ``save_to_disk`` (a saved ``DatasetDict`` needs a split). :func:`read_source`
yields every row as a record (a dict, nested fields kept) or, for a row that cannot be read
(``invalid_utf8``, ``invalid_json``), the reason and the raw text, so the import stage can quarantine
it. :func:`source_digest` hashes the source's content, which is what an import's artifact id hashes
(never its path). Mapping records onto columns is :mod:`prefloop.tasks.importing.mapping`.

An import reads its source once: :func:`snapshot_source` copies the source into a private folder
while hashing the bytes it copies (the same digest as :func:`source_digest`), and the rows are then
read from that copy. A source that changes while it is imported therefore gets the id of exactly
the bytes that were imported, never the id of one version and the rows of another.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

SourceFormat = Literal["jsonl", "parquet", "csv", "datasets"]
FILE_FORMATS: dict[str, SourceFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


class SourceImportError(ValueError):
    """A source that cannot be imported as a whole (unreadable, wrong mapping …); nothing is written."""


@dataclass
class SourceRow:
    """One row of a source: its position, and its record or why it could not be read."""

    index: int
    record: dict[str, Any] | None  # None when the row could not be read at all
    problem: tuple[str, str] | None = None  # (reason, detail) for unreadable rows
    raw: str = ""


def detect_format(path: Path) -> SourceFormat:
    if not path.exists():
        raise SourceImportError(f"source {path} does not exist")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "datasets"
        formats = {FILE_FORMATS[p.suffix.lower()] for p in _data_files(path, None)}
        if len(formats) != 1:
            found = sorted({p.suffix for p in path.rglob("*") if p.is_file()})
            raise SourceImportError(
                f"folder {path} must hold files of one format (.jsonl, .parquet or .csv) or a dataset saved with "
                f"datasets' save_to_disk; it has {found or 'no files'}")
        return formats.pop()
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise SourceImportError(f"cannot tell the format of {path} from its suffix '{suffix}': use a .jsonl, .parquet or "
                                ".csv file, or a folder saved with datasets' save_to_disk")
    return FILE_FORMATS[suffix]


def _data_files(path: Path, fmt: SourceFormat | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [p for p in files if fmt is None or FILE_FORMATS[p.suffix.lower()] == fmt]


def source_digest(path: Path) -> str:
    """sha256 over (relative path, bytes) of every file of the source, in sorted order."""
    return _hash_source(path, None, None)


def _hash_source(path: Path, copy_to: Path | None, keep: Callable[[str], bool] | None) -> str:
    """:func:`source_digest`, copying each file (those ``keep`` accepts) under ``copy_to`` as it is hashed."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        # A single file is its bytes (renaming it changes nothing); a folder's layout is part of its content.
        name = "" if path.is_file() else file.relative_to(path).as_posix()
        digest.update(name.encode("utf-8") + b"\0")
        target = None
        if copy_to is not None and (keep is None or keep(name or file.name)):
            target = copy_to / (name or file.name)
            target.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as handle, (target.open("wb") if target else contextlib.nullcontext()) as out:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                if out is not None:
                    out.write(block)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceSnapshot:
    """A private copy of a source and the digest of exactly the bytes copied."""

    path: Path  # the copy: a file for a file source, a folder for a folder source
    digest: str
    original: Path

    def shown(self, file: Path) -> Path:
        """The original path of ``file`` (inside the copy), for messages."""
        return self.original if file == self.path else self.original / file.relative_to(self.path)


@contextlib.contextmanager
def snapshot_source(path: Path, keep: Callable[[str], bool] | None = None) -> Iterator[SourceSnapshot]:
    """Copy ``path`` into a temporary folder while hashing it (one read of every file), and remove the copy
    afterwards. ``keep(relative_name)`` picks the files copied; every file is hashed."""
    scratch = Path(tempfile.mkdtemp(prefix="prefloop-import-"))
    try:
        copy = scratch / ("source" if path.is_dir() else path.name)
        if path.is_dir():
            copy.mkdir()
        digest = _hash_source(path, copy if path.is_dir() else scratch, keep)
        yield SourceSnapshot(copy, digest, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_source(path: Path, fmt: SourceFormat, dataset_split: str | None = None,
                shown_as: Path | None = None) -> Iterator[SourceRow]:
    """Every row of the source as a record (a dict, nested fields kept), or a row that could not be read.

    ``shown_as`` is the path messages name (the original of a :class:`SourceSnapshot`'s copy)."""
    shown = shown_as or path
    if fmt == "datasets":
        yield from _read_saved_dataset(path, dataset_split, shown)
        return
    if dataset_split is not None:
        raise SourceImportError(f"--split {dataset_split} only applies to a saved DatasetDict, and {shown} is {fmt}")
    index = 0
    for file in _data_files(path, fmt):
        reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        relative = "" if path.is_file() else file.relative_to(path).as_posix()
        for row in reader(file, f"{relative} " if relative else "", shown / relative if relative else shown):
            row.index = index
            index += 1
            yield row


def _read_jsonl(file: Path, where_prefix: str, shown: Path) -> Iterator[SourceRow]:
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{where_prefix}line {number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield SourceRow(0, None, ("invalid_utf8", f"{where}: not UTF-8 ({error.reason} at byte {error.start})"),
                                line.decode("utf-8", errors="backslashreplace").rstrip("\n"))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield SourceRow(0, None, ("invalid_json", f"{where}: {error.msg} at column {error.colno}"), text.rstrip("\n"))
                continue
            if not isinstance(record, dict):
                yield SourceRow(0, None, ("invalid_json", f"{where}: a JSON {type(record).__name__}, not an object"),
                                text.rstrip("\n"))
                continue
            yield SourceRow(0, record, raw=text.rstrip("\n"))


def _read_csv(file: Path, where_prefix: str, shown: Path) -> Iterator[SourceRow]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad cell drops one row, not the file.
    with file.open("r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        for number, record in enumerate(csv.DictReader(handle), start=2):
            bad = [key for key, value in record.items() if isinstance(value, str) and _has_surrogates(value)]
            if bad:
                raw = json.dumps({k: (v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                                      if isinstance(v, str) else v) for k, v in record.items()}, ensure_ascii=False)
                yield SourceRow(0, None, ("invalid_utf8", f"{where_prefix}line {number}: field(s) {bad} are not UTF-8"), raw)
                continue
            # An empty CSV cell means "no value".
            yield SourceRow(0, {k: (v if v != "" else None) for k, v in record.items() if k is not None})


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in text)


def _read_parquet(file: Path, where_prefix: str, shown: Path) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceImportError(f"{shown} is not a readable Parquet file: {error}") from None
    yield from _table_rows(table)


def _table_rows(table: pa.Table) -> Iterator[SourceRow]:
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            yield SourceRow(0, record)


def _read_saved_dataset(path: Path, dataset_split: str | None, shown: Path) -> Iterator[SourceRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise SourceImportError(f"{shown} is not a dataset saved with datasets' save_to_disk: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if dataset_split is None:
            raise SourceImportError(f"{shown} is a saved DatasetDict with splits {sorted(loaded)}: choose one with --split")
        if dataset_split not in loaded:
            raise SourceImportError(f"{shown} has no split '{dataset_split}' (splits: {sorted(loaded)})")
        loaded = loaded[dataset_split]
    elif dataset_split is not None:
        raise SourceImportError(f"{shown} is a single saved Dataset, not a DatasetDict: leave out --split")
    for index, row in enumerate(_table_rows(loaded.with_format("arrow")[:])):
        row.index = index
        yield row
