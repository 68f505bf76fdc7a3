"""Exporters: artifacts out to the formats downstream tools read.

* ``trl`` — Parquet with exactly ``prompt``, ``chosen``, ``rejected`` (string columns), TRL's
  standard preference format; ``datasets.load_dataset("parquet", data_files=...)`` reads it.
* ``jsonl`` — one JSON object per row of the main table.
* ``parquet`` — the main table as one Parquet file, every column kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from prefloop.datasets_spec.schemas import PREFERENCES
from prefloop.storage import ArtifactRef, ArtifactStore

FORMATS = ("trl", "jsonl", "parquet")


def export_artifact(store: ArtifactStore, ref: ArtifactRef, out: str | Path, fmt: str) -> Path:
    """Write ``ref``'s main table under directory ``out``; returns the file written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    manifest = store.read_manifest(ref)
    if "data" not in manifest.tables:
        raise ValueError(f"{ref} holds files, not a table ({manifest.kind}): only table artifacts can be exported")
    table = store.read_table(ref)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "trl":
        if manifest.schema_id != PREFERENCES.schema_id:
            raise ValueError(
                f"--format trl needs a preferences artifact, but {ref} is {manifest.schema_id}; "
                "use --format jsonl or parquet for other tables"
            )
        path = out / "train.parquet"
        pq.write_table(table.select(["prompt", "chosen", "rejected"]), path, compression="zstd")
    elif fmt == "parquet":
        path = out / f"{manifest.kind}.parquet"
        pq.write_table(table, path, compression="zstd")
    else:
        path = out / f"{manifest.kind}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    (out / "prefloop-export.json").write_text(
        json.dumps({"artifact": str(ref), "format": fmt, "rows": table.num_rows, "file": path.name,
                    "stage": f"{manifest.stage}@{manifest.stage_version}", "inputs": manifest.inputs}, indent=2)
    )
    return path
