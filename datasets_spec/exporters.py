"""Exporters: artifacts out to the formats downstream tools read.

* ``trl`` — Parquet with exactly ``prompt``, ``chosen``, ``rejected`` (string columns), TRL's
  standard preference format; ``datasets.load_dataset("parquet", data_files=...)`` reads it.
* ``trl-conversational`` — the same rows in TRL's conversational preference format: ``prompt`` a list
  of messages (one user message), ``chosen`` and ``rejected`` one assistant message each
  (``{"role", "content"}`` structs); TRL renders them with the trained model's chat template.
  Prompts in artifacts are the user's plain text (rendering happens at the model boundary,
  :mod:`prefloop.chat`), so either format is right for any model.
* ``jsonl`` — one JSON object per row of the main table.
* ``parquet`` — the main table as one Parquet file, every column kept.

Sampled token ids (``chosen_token_ids``, ``rejected_token_ids``, ``tokenizer_fingerprint``) are left out
of both TRL formats: TRL tokenises ``prompt``/``chosen``/``rejected`` itself with the trained model's
tokenizer, its preference formats have exactly those columns, and the ids mean something only to the
tokenizer that sampled them. ``jsonl`` and ``parquet`` are the artifact's full table and keep them
(lists of integers), so an export read back loses nothing.

An export never overwrites: an existing non-empty ``out`` is refused unless ``force`` is given, and
even then only an earlier export (a folder with ``prefloop-export.json``) is replaced. The export is
written to a sibling folder first and moved into place when complete, so a failed export leaves
``out`` as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefloop.chat import assistant_messages, user_messages
from prefloop.datasets_spec.schemas import PREFERENCES
from prefloop.errors import UserError
from prefloop.storage import ArtifactRef, ArtifactStore

FORMATS = ("trl", "trl-conversational", "jsonl", "parquet")
PREFERENCE_FORMATS = ("trl", "trl-conversational")
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
RECORD = "prefloop-export.json"


class ExportError(UserError):
    """An export that cannot be written as asked (format, artifact or output folder); nothing was written."""


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite: ``out`` must be new or empty, or (with ``force``) an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder: choose a new folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"--out {out} already exists and is not empty: choose a new folder, or pass --force to "
                          "replace an earlier export there")
    if not (out / RECORD).exists():
        raise ExportError(f"--out {out} holds files that are not a prefloop export (no {RECORD}), so --force does not "
                          "replace it: choose a new or empty folder")


def export_artifact(store: ArtifactStore, ref: ArtifactRef, out: str | Path, fmt: str, force: bool = False) -> Path:
    """Write ``ref``'s main table under directory ``out``; returns the file written.

    ``out`` must be new or empty; with ``force`` an earlier export there is replaced."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    manifest = store.read_manifest(ref)
    if "data" not in manifest.tables:
        raise ExportError(f"{ref} holds files, not a table ({manifest.kind}): only table artifacts can be exported")
    if fmt in PREFERENCE_FORMATS and manifest.schema_id != PREFERENCES.schema_id:
        raise ExportError(f"--format {fmt} needs a preferences artifact, but {ref} is {manifest.schema_id}; "
                          "use --format jsonl or parquet for other tables")
    check_output(out, force)
    table = store.read_table(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        name = _write(table, manifest, ref, fmt, staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / name


def _write(table, manifest, ref: ArtifactRef, fmt: str, out: Path) -> str:
    if fmt == "trl":
        path = out / "train.parquet"
        pq.write_table(table.select(["prompt", "chosen", "rejected"]), path, compression="zstd")
    elif fmt == "trl-conversational":
        path = out / "train.parquet"
        pq.write_table(conversational(table), path, compression="zstd")
    elif fmt == "parquet":
        path = out / f"{manifest.kind}.parquet"
        pq.write_table(table, path, compression="zstd")
    else:
        path = out / f"{manifest.kind}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    (out / RECORD).write_text(
        json.dumps({"artifact": str(ref), "format": fmt, "rows": table.num_rows, "file": path.name,
                    "stage": f"{manifest.stage}@{manifest.stage_version}", "inputs": manifest.inputs}, indent=2)
    )
    return path.name


def conversational(table: pa.Table) -> pa.Table:
    """``prompt`` / ``chosen`` / ``rejected`` as message lists (TRL's conversational preference format)."""
    prompts, chosen, rejected = (table.column(name).to_pylist() for name in ("prompt", "chosen", "rejected"))
    return pa.table({
        "prompt": pa.array([user_messages(text) for text in prompts], MESSAGES),
        "chosen": pa.array([assistant_messages(text) for text in chosen], MESSAGES),
        "rejected": pa.array([assistant_messages(text) for text in rejected], MESSAGES),
    })


def _replace(staging: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export (checked by :func:`check_output`) goes only
    once the new one is complete."""
    if out.exists():
        retired = staging.with_name(staging.name + ".old")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)
