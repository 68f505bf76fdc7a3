"""Data contracts, applied at every boundary where a table enters the store.

A write goes through three steps:

1. **conform** — required columns must be there (else :class:`ContractError`, nothing is
   written), types are cast to the declared schema, missing optional columns become nulls.
2. **quarantine** — every row rule of the :class:`TableSpec` is evaluated with vectorised
   Arrow compute on **every row**; a row that breaks one is moved to the ``drops`` table with the
   rule's named reason (first broken rule wins) and its original content as JSON. This is the
   guarantee: a row that breaks a rule is never published.
3. **validate** — the table's great-expectations suite, built from the same rules, runs on a
   deterministic sample of the kept rows (every row of a table up to :data:`SUITE_SAMPLE_ROWS`
   rows; of a larger one, that many rows evenly spread from the first to the last) in an ephemeral
   context (no files, no network). It must pass; its report — with the rows it saw — goes into the
   artifact's manifest. It is the readable, independent second opinion on the rules, not the gate:
   its cost is mostly fixed per call plus about a microsecond per row (pandas copy, GX's hash of
   the batch, its metrics), so on every row it cost 3× the Parquet write of a million rows
   (docs/validation.md has the measurements).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.datasets_spec.schemas import DROPS, RowRule, TableSpec


class ContractError(ValueError):
    """A table cannot be accepted as a whole (e.g. a required column is missing)."""


@dataclass
class ContractResult:
    kept: pa.Table
    drops: pa.Table
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def drop_counts(self) -> dict[str, int]:
        return dict(self.report.get("quarantined", {}))


def empty_drops() -> pa.Table:
    return DROPS.schema.empty_table()


def conform(table: pa.Table, spec: TableSpec, source: str = "table") -> tuple[pa.Table, list[str]]:
    """Select and cast ``table``'s columns to ``spec``'s schema. Returns (table, ignored columns)."""
    present = set(table.column_names)
    missing = [c for c in spec.required if c not in present]
    if missing:
        raise ContractError(
            f"{source} has no column {', '.join(repr(c) for c in missing)} "
            f"(schema {spec.schema_id}/{spec.version} requires {', '.join(spec.required)}; "
            f"it has {', '.join(table.column_names) or 'no columns'}). Nothing was written. "
            "Rename or map the column (e.g. 'prefloop import … --map chosen=response_a'), "
            "or check that the input was made by this version of prefloop ('prefloop validate REF')."
        )
    columns = []
    for spec_field in spec.fields:
        if spec_field.name not in present:
            columns.append(pa.nulls(table.num_rows, spec_field.type))
            continue
        column = table.column(spec_field.name)
        if column.type != spec_field.type:
            try:
                column = column.cast(spec_field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise ContractError(
                    f"{source}: column '{spec_field.name}' has type {column.type}, which cannot be read as "
                    f"{spec_field.type} (schema {spec.schema_id}/{spec.version}): {error}. Nothing was written."
                ) from None
        columns.append(column)
    ignored = [c for c in table.column_names if c not in spec.column_names]
    return pa.Table.from_arrays(columns, schema=spec.schema), ignored


def _bad_mask(table: pa.Table, rule: RowRule) -> pa.Array:
    """True where ``rule`` is broken. Nulls pass every rule but not_null."""
    column = table.column(rule.column)
    if rule.check == "not_null":
        bad = pc.is_null(column, nan_is_null=pa.types.is_floating(column.type))
    elif rule.check == "non_empty":
        bad = pc.equal(pc.binary_length(column), 0)  # no bytes ⇔ no characters; read off the offsets
    elif rule.check == "finite":
        bad = pc.invert(pc.is_finite(column))
    elif rule.check == "in_set":
        bad = pc.invert(pc.is_in(column, value_set=pa.array(rule.values, type=column.type)))
        bad = pc.if_else(pc.is_null(column), False, bad)
    elif rule.check == "between":
        bad = pc.or_(
            pc.less(column, rule.min_value) if rule.min_value is not None else pc.is_null(column),
            pc.greater(column, rule.max_value) if rule.max_value is not None else pc.is_null(column),
        )
    elif rule.check == "columns_differ":
        bad = pc.equal(column, table.column(rule.other))
    else:  # pragma: no cover - unique is handled apart
        raise ValueError(f"unknown rule check {rule.check}")
    return pc.fill_null(bad, False).combine_chunks() if isinstance(bad, pa.ChunkedArray) else pc.fill_null(bad, False)


def _duplicates(table: pa.Table, column: str) -> np.ndarray:
    """Boolean mask of rows whose ``column`` value appeared in an earlier row (first one kept).

    Ids of one width (prefloop's content ids are 16 hex characters) take a sort-based path: each
    value's bytes fold into one 64-bit key (:func:`_fixed_width_keys`), and equal values have equal
    keys, so if the sorted keys have no neighbour equal, every value is distinct. A 64-bit sort is
    about a tenth of a hash table of 1M strings (0.015 s vs 0.14 s), which was most of the row
    rules' time. Only rows whose key is shared go through the exact, hash-based check, so a key
    collision costs time, never a wrong answer.
    """
    values = table.column(column)
    keys = _fixed_width_keys(values)
    if keys is None:
        return _exact_duplicates(values)
    ordered = np.sort(keys)
    shared = ordered[1:][ordered[1:] == ordered[:-1]]
    duplicate = np.zeros(table.num_rows, dtype=bool)
    if len(shared):
        rows = np.flatnonzero(np.isin(keys, shared))  # ascending, so "earlier row" keeps its meaning
        duplicate[rows] = _exact_duplicates(values.take(pa.array(rows)))
    return duplicate


def _exact_duplicates(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if len(pc.unique(values)) == len(values):  # null counts as one value, as in group_by
        return np.zeros(len(values), dtype=bool)  # the usual case, and one hash pass cheaper
    indexed = pa.table({"key": values, "index": pa.array(np.arange(len(values)))})
    first = indexed.group_by("key", use_threads=False).aggregate([("index", "min")]).column("index_min")
    keep = np.zeros(len(values), dtype=bool)
    keep[first.to_numpy()] = True
    return ~keep


_KEY_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection mod 2**64


def _fixed_width_keys(values: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """One uint64 per value, equal for equal values: the value's bytes in 8-byte words w_0 … w_{k-1}
    folded as ``key = (…(w_0·m + w_1)·m + …)·m + w_{k-1} mod 2**64`` (zero-padded to whole words).
    None where this does not apply: not a string or binary column, a null, or values of unequal
    widths (the caller then uses the exact check)."""
    if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)) or values.null_count or not len(values):
        return None
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    offsets = np.frombuffer(array.buffers()[1], np.int32, len(array) + 1, array.offset * 4)
    widths = np.diff(offsets)
    width = int(widths[0])
    if width == 0 or (widths != width).any():
        return None
    data = np.frombuffer(array.buffers()[2], np.uint8, offsets[-1] - offsets[0], int(offsets[0]))
    words = -(-width // 8)
    if width % 8:
        padded = np.zeros((len(array), words * 8), np.uint8)
        padded[:, :width] = data.reshape(len(array), width)
        data = padded
    matrix = np.ascontiguousarray(data).view(np.uint64).reshape(len(array), words)
    keys = matrix[:, 0].copy()
    for column in range(1, words):
        keys *= _KEY_MULTIPLIER
        keys += matrix[:, column]
    return keys


def _row_ids(table: pa.Table) -> pa.Array:
    for candidate in ("pair_id", "sample_id", "label_id", "node_id", "prompt_id"):
        if candidate in table.column_names:
            return table.column(candidate).cast(pa.string())
    return pa.nulls(table.num_rows, pa.string())


def make_drops(table: pa.Table, indices: np.ndarray, reasons: list[str], table_name: str, detail: str = "") -> pa.Table:
    """Build a ``drops`` table for the rows ``indices`` of ``table``, one reason each."""
    if len(indices) == 0:
        return empty_drops()
    picked = table.take(pa.array(indices))
    rows = [json.dumps(row, default=str, ensure_ascii=False) for row in picked.to_pylist()]
    return pa.Table.from_arrays(
        [
            pa.array([table_name] * len(indices), pa.string()),
            _row_ids(picked),
            pa.array(indices, pa.int64()),
            pa.array(reasons, pa.string()),
            pa.array([detail] * len(indices), pa.string()),
            pa.array(rows, pa.string()),
        ],
        schema=DROPS.schema,
    )


def quarantine(table: pa.Table, spec: TableSpec) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Split a conformed table into (kept rows, drops, counts by reason)."""
    reasons = [rule.reason for rule in spec.rules]
    code = np.full(table.num_rows, -1, dtype=np.int16)  # index into reasons; -1 keeps the row
    for index, rule in enumerate(spec.rules):
        if rule.check == "unique":
            continue
        bad = _bad_mask(table, rule)
        if not pc.any(bad).as_py():
            continue
        code[bad.to_numpy(zero_copy_only=False) & (code < 0)] = index
    # Uniqueness is judged among rows that pass everything else, so a broken row cannot make a
    # good one look like a duplicate.
    for index, rule in enumerate(spec.rules):
        if rule.check != "unique":
            continue
        alive = np.flatnonzero(code < 0)
        candidates = table if len(alive) == table.num_rows else table.take(pa.array(alive))
        code[alive[_duplicates(candidates, rule.column)]] = index
    dropped = np.flatnonzero(code >= 0)
    if len(dropped) == 0:
        return table, empty_drops(), {}
    kept = table.filter(pa.array(code < 0))
    row_reasons = [reasons[c] for c in code[dropped]]
    counts: dict[str, int] = {}
    for reason in row_reasons:
        counts[reason] = counts.get(reason, 0) + 1
    drops = make_drops(table, dropped, row_reasons, spec.name, detail=f"data contract {spec.schema_id}/{spec.version}")
    return kept, drops, counts


# ---------------------------------------------------------------------------------------------
# great-expectations suite
# ---------------------------------------------------------------------------------------------
_GX_LOCK = threading.Lock()
_GX_STATE: dict[str, Any] = {}
FLOAT_MAX = float(np.finfo(np.float64).max)
SUITE_SAMPLE_ROWS = 10_000
"""Rows the great-expectations suite sees: all of a table up to this size, else this many, evenly spread."""


def suite_sample(num_rows: int, sample_rows: int | None = SUITE_SAMPLE_ROWS) -> np.ndarray:
    """The rows (indices, ascending) the suite validates: systematic sampling that always includes the
    first and the last row — deterministic, so a rerun validates the same rows. ``None``: every row."""
    if sample_rows is None or num_rows <= sample_rows:
        return np.arange(num_rows)
    return np.unique(np.linspace(0, num_rows - 1, sample_rows).round().astype(np.int64))


def _gx_context() -> Any:
    if "context" not in _GX_STATE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            analytics_enabled=False,
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        source = context.data_sources.add_pandas("prefloop")
        _GX_STATE.update(gx=gx, context=context, source=source, batches={})
    return _GX_STATE["context"]


def _expectations(spec: TableSpec) -> list[Any]:
    gxe = _GX_STATE["gx"].expectations
    suite: list[Any] = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=spec.column_names)]
    for rule in spec.rules:
        col = rule.column
        if rule.check == "not_null":
            suite.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        elif rule.check == "non_empty":
            suite.append(gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1))
        elif rule.check == "finite":
            suite.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=-FLOAT_MAX, max_value=FLOAT_MAX))
        elif rule.check == "in_set":
            suite.append(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(rule.values)))
        elif rule.check == "between":
            suite.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=rule.min_value, max_value=rule.max_value))
        elif rule.check == "unique":
            suite.append(gxe.ExpectColumnValuesToBeUnique(column=col))
        # columns_differ has no built-in expectation; the quarantine step enforces it.
    return suite


def _suite_and_batch(spec: TableSpec) -> tuple[Any, Any]:
    context = _gx_context()
    batches = _GX_STATE["batches"]
    if spec.name not in batches:
        gx = _GX_STATE["gx"]
        suite = gx.ExpectationSuite(name=f"{spec.schema_id}.v{spec.version}")
        for expectation in _expectations(spec):
            suite.add_expectation(expectation)
        suite = context.suites.add(suite)
        asset = _GX_STATE["source"].add_dataframe_asset(spec.name)
        batches[spec.name] = (suite, asset.add_batch_definition_whole_dataframe(f"{spec.name}-whole"))
    return batches[spec.name]


def run_suite(table: pa.Table, spec: TableSpec, sample_rows: int | None = SUITE_SAMPLE_ROWS) -> dict[str, Any]:
    """Run the great-expectations suite of ``spec`` on :func:`suite_sample` rows of ``table``; return a
    readable report (``rows_validated`` of ``rows_total``). ``sample_rows=None`` validates every row."""
    from great_expectations.validator.v1_validator import Validator

    rows = suite_sample(table.num_rows, sample_rows)
    sample = table if len(rows) == table.num_rows else table.take(pa.array(rows))
    frame = sample.to_pandas()  # outside the lock: only GX's context must not be shared
    with _GX_LOCK:
        suite, batch_definition = _suite_and_batch(spec)
        # One Validator for the whole suite: going through Batch.validate would load the batch
        # twice, and GX fingerprints (hashes) the full DataFrame on every load. BOOLEAN_ONLY skips
        # the unexpected-value bookkeeping (15 % of the suite's time); only a failed suite, whose
        # error reports the counts, is run again with them.
        for result_format in ("BOOLEAN_ONLY", "BASIC"):
            validator = Validator(batch_definition=batch_definition, batch_parameters={"dataframe": frame},
                                  result_format=result_format)
            result = validator.validate_expectation_suite(suite)
            if result.success:
                break
    expectations = []
    for item in result.results:
        config = item.expectation_config
        expectations.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column"),
                "success": bool(item.success),
                "unexpected_count": (item.result or {}).get("unexpected_count"),
            }
        )
    return {
        "engine": f"great_expectations {_GX_STATE['gx'].__version__}",
        "suite": suite.name,
        "success": bool(result.success),
        "evaluated": len(expectations),
        "failed": [e for e in expectations if not e["success"]],
        "rows_validated": len(rows),
        "rows_total": table.num_rows,
        "sample": "every row" if len(rows) == table.num_rows else
                  f"systematic: {len(rows)} rows evenly spread from the first to the last (the row rules saw every row)",
    }


def check_rows(table: pa.Table, spec: TableSpec, source: str = "table") -> ContractResult:
    """Conform and quarantine; the report has no suite result yet (see :func:`attach_suite`)."""
    conformed, ignored = conform(table, spec, source)
    kept, drops, counts = quarantine(conformed, spec)
    report = {
        "schema": f"{spec.schema_id}/{spec.version}",
        "rows_in": table.num_rows,
        "rows_kept": kept.num_rows,
        "quarantined": counts,
        "ignored_columns": ignored,
        # What guarantees the published rows: every rule, on every row, before anything is written.
        "row_rules": {"engine": f"pyarrow {pa.__version__}", "rules": len(spec.rules), "rows_checked": table.num_rows},
    }
    return ContractResult(kept=kept, drops=drops, report=report)


def attach_suite(result: ContractResult, suite_report: dict[str, Any], spec: TableSpec, source: str) -> ContractResult:
    """Record the suite's report; a failing suite refuses the whole table."""
    if not suite_report["success"]:
        failed = "; ".join(f"{e['expectation']}({e['column']}): {e['unexpected_count']} rows" for e in suite_report["failed"])
        seen = suite_report.get("rows_validated", suite_report.get("rows_total"))
        raise ContractError(
            f"{source} failed its data contract {spec.schema_id}/{spec.version} after quarantine: {failed} "
            f"(of the {seen} rows the great-expectations suite validated). Nothing was written. The suite asks "
            "something the row rules did not enforce: this is a bug in prefloop's contract rules; please report it "
            "with the input."
        )
    result.report["suite"] = suite_report
    return result


def apply_contract(table: pa.Table, spec: TableSpec, source: str = "table",
                   sample_rows: int | None = SUITE_SAMPLE_ROWS) -> ContractResult:
    """Conform, quarantine and validate ``table`` against ``spec``.

    Raises :class:`ContractError` when the table as a whole is unacceptable; bad rows are not
    errors, they come back in ``drops``. ``sample_rows``: rows the great-expectations suite sees
    (:func:`suite_sample`; None: every row) — the row rules always see every row.
    """
    result = check_rows(table, spec, source)
    return attach_suite(result, run_suite(result.kept, spec, sample_rows), spec, source)


def check_readable(table: pa.Table, spec: TableSpec, source: str) -> pa.Table:
    """The read boundary: a stage's input must carry the columns its schema requires."""
    conformed, _ = conform(table, spec, source)
    return conformed
