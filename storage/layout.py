"""The store's layout, what a manifest records, and the store's errors: the vocabulary that
:mod:`prefloop.storage.store` (reads, refs), :mod:`prefloop.storage.writer` (writes, publishing) and
:mod:`prefloop.storage.gc` share.

Layout under the root (a local path, ``file://``, ``memory://``, ``s3://`` …)::

    artifacts/<kind>/<id>/manifest.json        written last: the commit marker
    artifacts/<kind>/<id>/data/part-00000.parquet   the artifact's main table (zstd)
    artifacts/<kind>/<id>/<table>/part-*.parquet    further tables (e.g. ``drops``)
    artifacts/<kind>/<id>/files/...             plain files (model weights, tokenizer)
    artifacts/<kind>/<id>/w-<nonce>/...         object stores: the same files, in their writer's folder
    artifacts/<kind>/<id>/.used                 object stores: rewritten by a cache hit (gc dates by it)
    checkpoints/<run>/step-<k>/                 a training run's checkpoints, same protocol
    refs/<name>.json                            human name -> artifact, with the log of moves
    tmp/<id>-<nonce>/                           writes in progress (ignored, cleaned by gc)

Readers trust an artifact only when its manifest exists and every file's sha256 matches it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from prefloop import __version__ as CODE_VERSION
from prefloop.errors import UserError

DEFAULT_STORE = "./.prefloop/store"
MAIN_TABLE = "data"
ROWS_PER_PART = 1_000_000
ARTIFACTS = "artifacts"
CHECKPOINTS = "checkpoints"
AREAS = (ARTIFACTS, CHECKPOINTS)
# gc never removes an artifact, staging directory or checkpoint younger than this: another process
# may have published it and not yet pointed its ref at it (see prefloop.storage.gc).
DEFAULT_GC_GRACE_S = 15 * 60.0
MANIFEST = "manifest.json"
# On object stores, the marker ArtifactStore.touch rewrites (an object's time cannot be changed in place).
USED_MARKER = ".used"
WRITER_PREFIX = "w-"  # per-writer folders inside an artifact's directory on object stores
# Protocols whose filesystems cache directory listings that other writers make stale.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
MANIFEST_PUT_ATTEMPTS = 4


class StoreError(Exception):
    """Base class of the store's errors; each message says what, why and how to fix."""


class ArtifactNotFoundError(StoreError):
    pass


class TamperedArtifactError(StoreError):
    pass


class ArtifactExistsError(StoreError):
    pass


class PublishError(StoreError):
    """Writing or publishing an artifact failed for a reason other than a lost race; nothing was
    published and the writer's staging directory is gone."""


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """A reference to one artifact: its kind and content id. Printed as ``kind/id``."""

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.id}"

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        kind, _, artifact_id = text.partition("/")
        if not kind or not artifact_id or "/" in artifact_id:
            raise UserError(f"'{text}' is not an artifact reference of the form kind/id")
        return cls(kind, artifact_id)


class FileEntry(BaseModel):
    path: str
    sha256: str
    bytes: int


class TableEntry(BaseModel):
    schema_id: str | None = None
    schema_version: int | None = None
    rows: int
    files: list[FileEntry]


class Manifest(BaseModel):
    """Everything needed to trust, explain and reproduce an artifact."""

    id: str
    kind: str
    stage: str
    stage_version: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    inputs: dict[str, str] = Field(default_factory=dict, description="role -> kind/id (lineage)")
    code_version: str = CODE_VERSION
    created_at: str
    schema_id: str | None = None
    schema_version: int | None = None
    rows: int = 0
    bytes: int = 0
    tables: dict[str, TableEntry] = Field(default_factory=dict)
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    drops: dict[str, int] = Field(default_factory=dict, description="reason -> rows dropped")
    files_prefix: str = Field(
        default="", pattern=r"^(w-[0-9a-f]{8,32})?$", description="folder inside the artifact's directory holding its files: one per writer on "
        "object stores (see the publish protocol in prefloop.storage.writer); empty: the directory itself")
    code: dict[str, Any] = Field(default_factory=dict, description="the code fingerprint of the stage that made it, "
                                 "the one its id used, and the module hashes it is made of")

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.kind, self.id)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
