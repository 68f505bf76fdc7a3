"""Mapping source records onto a table's columns: the ``--map`` language, value conversion, rows and ids.

``--map TARGET=SOURCE`` takes column TARGET from field SOURCE, a key or a dotted path into nested
records (``meta.final``, ``choices.0.text``); an unmapped column is taken from a field of its own
name. Each kind of import (prompts, samples, preferences) has its :data:`TARGETS`, and each target
says how a source value becomes it (:func:`_convert`: chat messages become text, numbers are
checked finite …). :func:`build_rows` turns records into columns and quarantines the rows that
cannot be imported, with a named reason; :func:`fill_ids` derives the ids the source did not give;
:func:`merge_prompt_rows` keeps each prompt of a prompts import once. Reading the source is
:mod:`prefloop.tasks.importing.sources`; the stages are :mod:`prefloop.tasks.importing.stage`.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.importing.sources import SourceImportError, SourceRow

ImportKind = Literal["prompts", "samples", "preferences"]
# A problem row: (source index, reason, detail, raw row).
Problem = tuple[int, str, str, str]


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
# Short names accepted on the command line for a column (``--map policy=model``).
TARGET_ALIASES = {"policy": "policy_name", "answer": "reference_answer", "solution": "reference_solution",
                  "response": "completion"}
# What lookup returns for a field the record does not have (None is a value: a JSON null).
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
            raise UserError("chat messages must be a list of {role: str, content: str} objects")
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


# One text field of an imported row (a prompt, a completion) may hold at most this many characters.
MAX_TEXT_CHARS = 1_000_000


class _RowProblem(Exception):
    """Why one row cannot be imported: a named drop reason and a detail."""

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
        text = str(value)
        if len(text) > MAX_TEXT_CHARS:
            raise _RowProblem("text_too_long", f"'{target.name}' has {len(text):,} characters, over the limit of "
                              f"{MAX_TEXT_CHARS:,}: a field that long is almost always a broken export")
        return text
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
class Rows:
    """Imported rows as columns, with each row's index in the source and its raw text (for drops)."""

    columns: dict[str, list]
    source_index: list[int]
    raw: list[str]


def build_rows(kind: ImportKind, rows: Iterator[SourceRow], mapping: dict[str, str], explode: str | None
               ) -> tuple[Rows, list[Problem], Counter, set[str]]:
    """The importable rows as ``kind``'s columns; the problem rows; how many rows had each mapped
    field; and every top-level field seen."""
    targets = TARGETS[kind]
    out = Rows({t.name: [] for t in targets}, [], [])
    problems: list[Problem] = []
    found: Counter = Counter()  # how many rows had each mapped source field
    seen_fields: set[str] = set()
    for row, item_index in _explode(rows, explode, problems):
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


def _explode(rows: Iterator[SourceRow], path: str | None, problems: list[Problem]
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


def fill_ids(kind: ImportKind, rows: Rows, split: str, policy_name: str | None) -> None:
    """Derive the ids and defaults the source did not give (``split`` and ``policy_name``: the
    defaults of rows of prompts and samples without one)."""
    columns = rows.columns
    count = len(rows.source_index)
    columns["prompt_id"] = [given or content_id("prompt", prompt)
                            for given, prompt in zip(columns["prompt_id"], columns["prompt"], strict=True)]
    if kind == "prompts":
        columns["split"] = [s or split for s in columns["split"]]
    elif kind == "samples":
        columns["policy_name"] = [p or policy_name for p in columns["policy_name"]]
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


def merge_prompt_rows(rows: Rows) -> tuple[list[int], list[Problem], int]:
    """Prompts repeated over rows (a completions file has one row per completion) are kept once;
    a prompt whose rows disagree on its reference answer is dropped whole, since it cannot be checked."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for position, prompt_id in enumerate(rows.columns["prompt_id"]):
        by_id[prompt_id].append(position)
    keep: list[int] = []
    problems: list[Problem] = []
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
