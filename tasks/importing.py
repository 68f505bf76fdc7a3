"""Import stages: bring your own prompts, completions, preference pairs and models into the store.

``prefloop import prompts|samples|preferences SRC --map TARGET=SOURCE …`` reads SRC — a JSONL,
Parquet or CSV file, a folder of such files, or a dataset saved with ``datasets``'
``save_to_disk`` (a saved ``DatasetDict`` needs ``--split``) — maps its fields onto the table's
columns and writes an artifact through the same data contracts as every stage:

* ``--map TARGET=SOURCE`` takes column TARGET from field SOURCE; SOURCE may be a dotted path into
  nested records (``reference_answer=meta.final``, ``completion=choices.0.text``). A column that is
  not mapped is taken from a source field of the same name, if there is one.
* Text fields may be plain strings or chat messages (``[{"role": …, "content": …}]``): a single
  message becomes its content, several become ``role: content`` blocks separated by blank lines.
* Rows that cannot be imported are quarantined in the artifact's ``drops`` table with a named
  reason — ``invalid_utf8``, ``invalid_json``, ``missing_prompt``, ``missing_completion``,
  ``empty_completion``, ``invalid_messages``, ``invalid_value``, ``conflicting_reference_answer`` —
  and then the table's contract quarantines what breaks its rules (duplicate ids, unknown splits …).
* The source is only read. The artifact id hashes the source's *content* (sha256 of its files)
  and the mapping, so importing the same data with the same mapping twice gives the same artifact.

Prompt ids are ``content_id("prompt", prompt text)`` unless mapped, so prompts and samples
imported from different files join on equal prompt texts.

``prefloop import model DIR`` imports a local transformers causal-LM directory (safetensors
weights, config, tokenizer and its chat template) as a checksummed model artifact that every stage
can use. Pickle-based weights are refused (loading them can run arbitrary code), and custom model
code is never run (``trust_remote_code`` stays off).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import DROPS, PREFERENCES, PROMPTS, SAMPLES, TableSpec
from prefloop.ids import content_id
from prefloop.stage import StageConfig, StageContext, StageOutput, StageResult, StageSpec, execute
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import stage_spec

if TYPE_CHECKING:
    from prefloop.tasks.registry import StageEntry

ImportKind = Literal["prompts", "samples", "preferences"]
SourceFormat = Literal["jsonl", "parquet", "csv", "datasets"]
FILE_FORMATS: dict[str, SourceFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


class SourceImportError(ValueError):
    """A source that cannot be imported as a whole (unreadable, wrong mapping …); nothing is written."""


# ---------------------------------------------------------------------------------------------
# what each kind of import produces
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One column an import can fill, and how a source value becomes it."""

    name: str
    kind: Literal["text", "int", "float", "id"]
    required: bool = False
    allow_empty: bool = False


TARGETS: dict[str, tuple[Target, ...]] = {
    "prompts": (
        Target("prompt", "text", required=True), Target("prompt_id", "id"), Target("reference_answer", "text"),
        Target("reference_solution", "text"), Target("task", "id"), Target("source", "id"), Target("split", "id"),
    ),
    "samples": (
        Target("prompt", "text", required=True), Target("completion", "text", required=True),
        Target("prompt_id", "id"), Target("sample_id", "id"), Target("policy_name", "id"),
        Target("policy_model_id", "id"), Target("sample_index", "int"), Target("completion_tokens", "int"),
        Target("sum_logprob", "float"), Target("finish_reason", "id"), Target("round", "int"),
        Target("temperature", "float"), Target("top_p", "float"), Target("seed", "int"),
    ),
    "preferences": (
        Target("prompt", "text", required=True), Target("chosen", "text", required=True),
        Target("rejected", "text", required=True), Target("prompt_id", "id"), Target("pair_id", "id"),
        Target("score_chosen", "float"), Target("score_rejected", "float"), Target("margin", "float"),
        Target("confidence", "float"), Target("method", "id"), Target("policy_model_id", "id"),
    ),
}
TABLES: dict[str, TableSpec] = {"prompts": PROMPTS, "samples": SAMPLES, "preferences": PREFERENCES}
# Short names accepted on the command line for a column (``--map policy=model``).
TARGET_ALIASES = {"policy": "policy_name", "answer": "reference_answer", "solution": "reference_solution",
                  "response": "completion"}


class ImportConfig(StageConfig):
    """What identifies an import: the source's content and how it is read and mapped (not its path)."""

    source_sha256: str = Field(description="sha256 over the source's files (relative path and bytes)")
    source_format: SourceFormat
    mapping: dict[str, str] = Field(default_factory=dict, description="TARGET column -> SOURCE field (dotted path)")
    dataset_split: str | None = Field(None, description="the split of a saved DatasetDict")
    split: Literal["train", "heldout"] = Field("train", description="prompts: split of rows without a split field")
    policy_name: str | None = Field(None, description="samples: policy name of rows without a policy field")
    explode: str | None = Field(None, description="a field holding a list (or a mapping) of items, each made a row")


class ImportSource(StageConfig):
    """An import as a flow or config file states it: where the data is and how to read it."""

    source: str = Field(description="a .jsonl/.parquet/.csv file, a folder of them, or a save_to_disk folder")
    map: dict[str, str] = Field(default_factory=dict, description="TARGET column -> SOURCE field (dotted path)")
    dataset_split: str | None = Field(None, description="the split of a saved DatasetDict")
    split: Literal["train", "heldout"] = Field("train", description="prompts: split of rows without a split field")
    policy_name: str | None = Field(None, description="samples: policy name of rows without a policy field")
    explode: str | None = Field(None, description="a field holding a list (or a mapping) of items, each made a row")

    def task_config(self) -> dict[str, Any]:
        """The mapping an import task takes (see :func:`execute_entry`)."""
        return {"source": self.source, "mapping": self.map, "dataset_split": self.dataset_split,
                "split": self.split, "policy_name": self.policy_name, "explode": self.explode}


def _spec(kind: ImportKind) -> StageSpec:
    return stage_spec(f"import-{kind}", version="1", config_model=ImportConfig, output_table=TABLES[kind],
                      description=f"Import {kind} from a JSONL/Parquet/CSV file or a saved dataset.")


PROMPTS_SPEC = _spec("prompts")
SAMPLES_SPEC = _spec("samples")
PREFERENCES_SPEC = _spec("preferences")
SPECS: dict[str, StageSpec] = {"prompts": PROMPTS_SPEC, "samples": SAMPLES_SPEC, "preferences": PREFERENCES_SPEC}


# ---------------------------------------------------------------------------------------------
# reading sources
# ---------------------------------------------------------------------------------------------
@dataclass
class SourceRow:
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
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        # A single file is its bytes (renaming it changes nothing); a folder's layout is part of its content.
        name = "" if path.is_file() else file.relative_to(path).as_posix()
        digest.update(name.encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def read_source(path: Path, fmt: SourceFormat, dataset_split: str | None = None) -> Iterator[SourceRow]:
    """Every row of the source as a record (a dict, nested fields kept), or a row that could not be read."""
    if fmt == "datasets":
        yield from _read_saved_dataset(path, dataset_split)
        return
    if dataset_split is not None:
        raise SourceImportError(f"--split {dataset_split} only applies to a saved DatasetDict, and {path} is {fmt}")
    index = 0
    for file in _data_files(path, fmt):
        reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        for row in reader(file, "" if path.is_file() else f"{file.relative_to(path).as_posix()} "):
            row.index = index
            index += 1
            yield row


def _read_jsonl(file: Path, where_prefix: str) -> Iterator[SourceRow]:
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


def _read_csv(file: Path, where_prefix: str) -> Iterator[SourceRow]:
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


def _read_parquet(file: Path, where_prefix: str) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceImportError(f"{file} is not a readable Parquet file: {error}") from None
    yield from _table_rows(table)


def _table_rows(table: pa.Table) -> Iterator[SourceRow]:
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            yield SourceRow(0, record)


def _read_saved_dataset(path: Path, dataset_split: str | None) -> Iterator[SourceRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise SourceImportError(f"{path} is not a dataset saved with datasets' save_to_disk: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if dataset_split is None:
            raise SourceImportError(f"{path} is a saved DatasetDict with splits {sorted(loaded)}: choose one with --split")
        if dataset_split not in loaded:
            raise SourceImportError(f"{path} has no split '{dataset_split}' (splits: {sorted(loaded)})")
        loaded = loaded[dataset_split]
    elif dataset_split is not None:
        raise SourceImportError(f"{path} is a single saved Dataset, not a DatasetDict: leave out --split")
    for index, row in enumerate(_table_rows(loaded.with_format("arrow")[:])):
        row.index = index
        yield row


# ---------------------------------------------------------------------------------------------
# mapping records onto columns
# ---------------------------------------------------------------------------------------------
_MISSING = object()


def lookup(record: dict[str, Any], path: str) -> Any:
    """A field of a nested record: the key itself if present, else a dotted path (list items by number)."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def messages_to_text(messages: list[Any]) -> str:
    """Chat messages as text: one message is its content; several are ``role: content`` blocks."""
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError("chat messages must be a list of {role: str, content: str} objects")
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


class _RowProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _convert(target: Target, value: Any) -> Any:
    """A source value as the target column's type, or a _RowProblem naming what is wrong."""
    if value is None or value is _MISSING:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _RowProblem("invalid_utf8", f"field for '{target.name}' is not UTF-8 ({error.reason})") from None
    if target.kind in ("text", "id"):
        if isinstance(value, list):
            if target.kind == "id":
                raise _RowProblem("invalid_value", f"'{target.name}' must be a single value, got a list")
            try:
                return messages_to_text(value)
            except ValueError as error:
                raise _RowProblem("invalid_messages", f"'{target.name}': {error}") from None
        if isinstance(value, bool) or isinstance(value, dict):
            raise _RowProblem("invalid_value", f"'{target.name}' must be text, got {type(value).__name__}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 42.0 read from Parquet is the answer "42"
        return str(value)
    try:
        number = int(value) if target.kind == "int" else float(value)
    except (TypeError, ValueError):
        raise _RowProblem("invalid_value", f"'{target.name}' must be a number, got {value!r}") from None
    if target.kind == "float" and not math.isfinite(number):
        raise _RowProblem("invalid_value", f"'{target.name}' is not finite ({value!r})")
    return number


def resolve_mapping(kind: ImportKind, mapping: dict[str, str]) -> dict[str, str]:
    """``mapping`` with aliases resolved, checked against the kind's columns."""
    names = {t.name for t in TARGETS[kind]}
    resolved: dict[str, str] = {}
    for target, source in mapping.items():
        name = TARGET_ALIASES.get(target, target) if target not in names else target
        if name not in names:
            raise SourceImportError(f"--map {target}={source}: '{target}' is not a column of {kind}; columns: "
                               f"{', '.join(t.name for t in TARGETS[kind])}")
        if not source:
            raise SourceImportError(f"--map {target}= needs a source field after '='")
        resolved[name] = source
    return dict(sorted(resolved.items()))


def parse_map_options(items: list[str]) -> dict[str, str]:
    """``["answer=meta.final", …]`` as a mapping; each item must be TARGET=SOURCE."""
    mapping: dict[str, str] = {}
    for item in items:
        target, sep, source = item.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise SourceImportError(f"--map '{item}' must look like TARGET=SOURCE, e.g. --map prompt=question "
                               "or --map reference_answer=meta.final for a nested field")
        mapping[target.strip()] = source.strip()
    return mapping


@dataclass
class _Rows:
    columns: dict[str, list]
    source_index: list[int]
    raw: list[str]


def _build_rows(kind: ImportKind, rows: Iterator[SourceRow], config: ImportConfig
                ) -> tuple[_Rows, list[tuple[int, str, str, str]], Counter, set[str]]:
    targets = TARGETS[kind]
    mapping = config.mapping
    out = _Rows({t.name: [] for t in targets}, [], [])
    problems: list[tuple[int, str, str, str]] = []  # (source index, reason, detail, raw row)
    found: Counter = Counter()  # how many rows had each mapped source field
    seen_fields: set[str] = set()
    for row, item_index in _explode(rows, config.explode, problems):
        seen_fields.update(row.record)
        values: dict[str, Any] = {}
        try:
            for target in targets:
                path = mapping.get(target.name, target.name)
                value = lookup(row.record, path)
                if target.name == "sample_index" and value is _MISSING and item_index is not None:
                    value = item_index
                if value is not _MISSING and target.name in mapping:
                    found[target.name] += 1
                values[target.name] = _convert(target, value)
                if target.required:
                    text = values[target.name]
                    if text is None:
                        raise _RowProblem(f"missing_{target.name}", f"no value for '{target.name}' (field '{path}')")
                    if not text.strip():
                        raise _RowProblem(f"empty_{target.name}" if target.name != "prompt" else "missing_prompt",
                                          f"'{target.name}' (field '{path}') is empty")
        except _RowProblem as problem:
            problems.append((row.index, problem.reason, problem.detail, row.raw or _json(row.record)))
            continue
        for name, value in values.items():
            out.columns[name].append(value)
        out.source_index.append(row.index)
        out.raw.append(row.raw or _json(row.record))
    return out, problems, found, seen_fields


def _explode(rows: Iterator[SourceRow], path: str | None, problems: list[tuple[int, str, str, str]]
             ) -> Iterator[tuple[SourceRow, int | None]]:
    """Readable rows (unreadable ones go to ``problems``); with ``path``, one row per item of that field.

    A list field gives its items; a mapping gives ``{"key": …, "value": …}`` items (e.g. policy name ->
    completion). In ``--map`` the item is addressed by the same path (``completion=outputs.text``).
    """
    for row in rows:
        if row.record is None:
            reason, detail = row.problem
            problems.append((row.index, reason, detail, row.raw))
            continue
        if path is None:
            yield row, None
            continue
        items = lookup(row.record, path)
        if isinstance(items, dict):
            items = [{"key": key, "value": value} for key, value in items.items()]
        raw = row.raw or _json(row.record)
        if not isinstance(items, list):
            what = "missing" if items is _MISSING or items is None else f"a {type(items).__name__}"
            problems.append((row.index, "invalid_value", f"--explode {path}: the field is {what}, not a list", raw))
            continue
        if not items:
            problems.append((row.index, "no_items", f"--explode {path}: the list is empty", raw))
            continue
        for item_index, item in enumerate(items):
            yield SourceRow(row.index, _replace(row.record, path, item), raw=raw), item_index


def _replace(record: dict[str, Any], path: str, item: Any) -> dict[str, Any]:
    """A shallow copy of ``record`` whose field at ``path`` (found by :func:`lookup`) is ``item``."""
    if path in record:
        return {**record, path: item}
    head, _, rest = path.partition(".")
    inner = record[head]
    if isinstance(inner, list):
        index, _, rest = rest.partition(".")
        copy = list(inner)
        copy[int(index)] = item if not rest else _replace(copy[int(index)], rest, item)
        return {**record, head: copy}
    return {**record, head: _replace(inner, rest, item)}


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _fill_ids(kind: ImportKind, rows: _Rows, config: ImportConfig) -> None:
    """Derive the ids and defaults the source did not give."""
    from prefloop.tasks.common.ids import pair_id

    columns = rows.columns
    count = len(rows.source_index)
    columns["prompt_id"] = [given or content_id("prompt", prompt)
                            for given, prompt in zip(columns["prompt_id"], columns["prompt"], strict=True)]
    if kind == "prompts":
        columns["split"] = [s or config.split for s in columns["split"]]
    elif kind == "samples":
        columns["policy_name"] = [p or config.policy_name for p in columns["policy_name"]]
        # Equal (prompt, policy, completion) triples are numbered, so ids stay unique and do not depend
        # on row order.
        occurrences: Counter = Counter()
        ids = []
        for given, prompt_id, policy, completion in zip(columns["sample_id"], columns["prompt_id"],
                                                        columns["policy_name"], columns["completion"], strict=True):
            key = (prompt_id, policy, completion)
            ids.append(given or content_id("sample", prompt_id, policy, completion, occurrences[key]))
            occurrences[key] += 1
        columns["sample_id"] = ids
    else:
        columns["pair_id"] = [given or pair_id(p, c, r) for given, p, c, r in zip(
            columns["pair_id"], columns["prompt"], columns["chosen"], columns["rejected"], strict=True)]
    assert all(len(v) == count for v in columns.values())


def _merge_prompt_rows(rows: _Rows) -> tuple[list[int], list[tuple[int, str, str, str]], int]:
    """Prompts repeated over rows (a completions file has one row per completion) are kept once;
    a prompt whose rows disagree on its reference answer is dropped whole, since it cannot be checked."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for position, prompt_id in enumerate(rows.columns["prompt_id"]):
        by_id[prompt_id].append(position)
    keep: list[int] = []
    problems: list[tuple[int, str, str, str]] = []
    merged = 0
    for positions in by_id.values():
        answers = {rows.columns["reference_answer"][p] for p in positions} - {None}
        if len(answers) > 1:
            for p in positions:
                problems.append((rows.source_index[p], "conflicting_reference_answer",
                                 f"rows of this prompt give different reference answers {sorted(answers)}", rows.raw[p]))
            continue
        first = positions[0]
        if answers and rows.columns["reference_answer"][first] is None:
            rows.columns["reference_answer"][first] = answers.pop()
        keep.append(first)
        merged += len(positions) - 1
    return sorted(keep), problems, merged


def _drops_table(kind: str, problems: list[tuple[int, str, str, str]]) -> pa.Table:
    problems = sorted(problems)
    return pa.Table.from_arrays([
        pa.array([f"source:{kind}"] * len(problems), pa.string()),
        pa.array([None] * len(problems), pa.string()),
        pa.array([p[0] for p in problems], pa.int64()),
        pa.array([p[1] for p in problems], pa.string()),
        pa.array([p[2] for p in problems], pa.string()),
        pa.array([p[3] for p in problems], pa.string()),
    ], schema=DROPS.schema)


def _import_compute(kind: ImportKind, source: Path):
    def compute(ctx: StageContext) -> StageOutput:
        config: ImportConfig = ctx.config
        rows, problems, found, seen_fields = _build_rows(
            kind, read_source(source, config.source_format, config.dataset_split), config)
        never = [f"{target}={path}" for target, path in config.mapping.items() if not found[target]]
        if never and seen_fields:
            raise SourceImportError(
                f"no row of {source} has the field(s) {', '.join(never)}; fields seen: {', '.join(sorted(seen_fields))}. "
                "Use a dotted path for a nested field (--map reference_answer=meta.final)")
        source_rows = len(rows.source_index) + len(problems)
        _fill_ids(kind, rows, config)
        metrics: dict[str, Any] = {}
        if kind == "prompts":
            keep, conflicts, merged = _merge_prompt_rows(rows)
            problems += conflicts
            rows.columns = {name: [values[i] for i in keep] for name, values in rows.columns.items()}
            metrics["merged_repeated_prompts"] = merged
        schema = pa.schema([f for f in TABLES[kind].schema if f.name in rows.columns])
        table = pa.Table.from_pydict(rows.columns, schema=schema)
        used_roots = {path.split(".")[0] for path in config.mapping.values()}
        metrics = {
            "source": str(source), "source_format": config.source_format, "source_rows": source_rows,
            "imported_rows": table.num_rows, "rejected_source_rows": len(problems),
            "mapping": {t.name: config.mapping.get(t.name, t.name) for t in TARGETS[kind]
                        if t.name in config.mapping or t.name in seen_fields},
            "ignored_fields": sorted(f for f in seen_fields if f not in used_roots
                                     and f not in {t.name for t in TARGETS[kind]}),
            **metrics,
        }
        return StageOutput(table=table, drops=_drops_table(kind, problems), metrics=metrics)

    return compute


def import_table(kind: ImportKind, source: str | Path, store: ArtifactStore, mapping: dict[str, str] | None = None,
                 dataset_split: str | None = None, split: str = "train", policy_name: str | None = None,
                 name: str | None = None, explode: str | None = None) -> StageResult:
    """Import ``source`` as a ``kind`` artifact (a lookup when the same content and mapping were imported)."""
    if kind not in SPECS:
        raise SourceImportError(f"cannot import '{kind}': importable tables are {', '.join(SPECS)} (and 'model')")
    path = Path(source).expanduser()
    fmt = detect_format(path)
    config = {"source_sha256": source_digest(path), "source_format": fmt,
              "mapping": resolve_mapping(kind, dict(mapping or {})), "dataset_split": dataset_split,
              "split": split, "policy_name": policy_name, "explode": explode}
    return execute(SPECS[kind], _import_compute(kind, path), {}, config, store, name)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeModelError(ValueError):
    """A model directory that prefloop will not load: pickled weights or custom model code."""


def _conversion_help(path: Path) -> str:
    return (
        "Convert it once, in a trusted environment, to safetensors: python -c \"from transformers import "
        "AutoModelForCausalLM, AutoTokenizer; "
        f"m = AutoModelForCausalLM.from_pretrained('{path}'); m.save_pretrained('{path}-safetensors', "
        f"safe_serialization=True); AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
        f"and import '{path}-safetensors'. Only do this for a checkpoint you trust: unpickling it runs code."
    )


def check_model_dir(path: str | Path) -> list[Path]:
    """The safetensors weight files of a local causal-LM directory; refuses what cannot be loaded safely.

    Refused: no ``config.json``; weights only in pickle formats (``*.bin``, ``*.pt`` …); a config that
    needs custom model code (``auto_map``), since ``trust_remote_code`` is never enabled; a model type
    transformers has no causal-LM class for.
    """
    path = Path(path)
    if not path.is_dir():
        raise UnsafeModelError(f"model source {path} is not a directory: give the folder save_pretrained wrote")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UnsafeModelError(f"{path} has no config.json: it is not a transformers model directory "
                               "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeModelError(
                f"{path} holds its weights only as pickle files ({', '.join(pickles)}), which prefloop refuses to "
                f"load because unpickling can run arbitrary code. {_conversion_help(path)}")
        raise UnsafeModelError(f"{path} has no *.safetensors weights: save the model with "
                               "model.save_pretrained(DIR, safe_serialization=True)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnsafeModelError(f"{config_file} is not valid JSON: {error}") from None
    if config.get("auto_map"):
        raise UnsafeModelError(
            f"{path} needs custom model code ({config_file.name} has 'auto_map'); prefloop never enables "
            "trust_remote_code. Use a model whose architecture transformers ships (e.g. Llama, Qwen2, Mistral).")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsafeModelError(f"{path}: model_type '{model_type}' has no causal-LM class in transformers; "
                               "a policy, reward model or judge must be a causal LM (AutoModelForCausalLM)")
    return weights


class ModelImportConfig(StageConfig):
    source_sha256: str = Field(description="sha256 over the model directory's files (relative path and bytes)")


MODEL_SPEC = stage_spec(
    "import-model", version="1", config_model=ModelImportConfig,
    description="Import a local transformers causal-LM directory (safetensors) as a model artifact.",
)


def _model_compute(source: Path):
    def compute(ctx: StageContext) -> StageOutput:
        from transformers import AutoTokenizer

        weights = check_model_dir(source)
        out = Path(tempfile.mkdtemp(prefix="prefloop-import-model-"))
        skipped = []
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = file.relative_to(source)
            if file.suffix.lower() in PICKLE_SUFFIXES or any(part.startswith(".") for part in relative.parts):
                skipped.append(relative.as_posix())  # e.g. training_args.bin: pickles are never carried along
                continue
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out / relative)
        try:
            tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - any failure here means the directory has no usable tokenizer
            shutil.rmtree(out, ignore_errors=True)
            raise UnsafeModelError(f"{source}: its tokenizer does not load ({type(error).__name__}: {error}); "
                                   "save it beside the model with tokenizer.save_pretrained(DIR)") from None
        metrics: dict[str, Any] = {"source": str(source), "weight_files": [w.name for w in weights],
                                   "skipped_files": skipped, "has_chat_template": bool(tokenizer.chat_template)}
        if tokenizer.eos_token_id is None:
            shutil.rmtree(out, ignore_errors=True)
            raise UnsafeModelError(f"{source}: the tokenizer has no eos token, so generation cannot stop; set "
                                   "tokenizer.eos_token and save it again")
        if tokenizer.pad_token_id is None:
            # Batched generation needs a pad token; the eos token is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.save_pretrained(out)
            metrics["pad_token_set_to_eos"] = True
        return StageOutput(files_dir=out, metrics=metrics)

    return compute


def import_model(source: str | Path, store: ArtifactStore, name: str | None = None) -> StageResult:
    """Import a local model directory as a checksummed model artifact (a lookup if already imported)."""
    path = Path(source).expanduser()
    check_model_dir(path)
    return execute(MODEL_SPEC, _model_compute(path), {}, {"source_sha256": source_digest(path)}, store, name)


# ---------------------------------------------------------------------------------------------
# running an import as a registered stage
# ---------------------------------------------------------------------------------------------
def execute_entry(entry: StageEntry, inputs: dict[str, str], config: Mapping[str, Any], store: ArtifactStore,
                  name: str | None = None) -> StageResult:
    """Run import stage ``entry`` with a flow's import config (:meth:`ImportSource.task_config`):
    its ``source`` is read here, and only the source's content (not its path) goes into the id."""
    if inputs:
        raise ValueError(f"stage '{entry.name}' takes no inputs (it reads a source file); got {sorted(inputs)}")
    options = dict(config)
    source = options.pop("source")
    if entry.output == "model":
        return import_model(source, store, name)
    return import_table(entry.output, source, store, name=name, **options)
