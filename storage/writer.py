"""Writing an artifact: staging its files, checksumming them, and publishing it with its manifest.

On a local filesystem a write goes to ``tmp/`` and is published with one atomic rename, so a write
killed midway leaves nothing a reader can see.

Object stores (``s3://`` through s3fs, ``gs://``, ``memory://`` …) have no rename, so the manifest
itself is the pointer that publishes. The protocol, and why it is safe:

1. Each writer puts its files under a folder of its own inside the artifact's directory,
   ``artifacts/<kind>/<id>/w-<nonce>/data/part-00000.parquet`` (the manifest's ``files_prefix``),
   so no two writers ever write the same key and no writer overwrites bytes another has listed.
2. Only when every file is stored (each PUT is atomic: an object is there whole or not at all)
   does it put ``manifest.json`` — one PUT, sent with ``If-None-Match: *`` (s3fs
   ``pipe_file(mode="create")``): S3 stores it only if no manifest is there yet, else answers
   412 Precondition Failed, which s3fs raises as FileExistsError.
3. A writer that gets the 412 lost the race: it reads the winner's manifest, deletes its own
   folder and returns the winner's manifest. Two writers of one id therefore leave one manifest
   that lists only the winner's files, all complete; S3's strong read-after-write consistency
   means every reader that finds the manifest then finds every file it lists.
4. A reader trusts a directory only through its manifest, and checks every file's sha256 and size
   against it as it reads (a corrupted or replaced object is a :class:`TamperedArtifactError`).

Where the server ignores ``If-None-Match`` (some S3-compatible servers, or filesystems whose
``pipe_file(mode="create")`` is check-then-write), the last manifest PUT wins instead of the first.
The protocol stays safe because of 1: whichever manifest survives lists its own writer's folder,
which is complete and which nobody deletes (a writer deletes its folder only after a 412), so a
reader sees one complete, verified artifact either way; the other folder is an orphan that gc
removes after its grace period. A writer killed before its manifest leaves a folder no manifest
lists — invisible to readers, removed by gc. gc removes an artifact by deleting its manifest first,
then exactly the objects it listed before that, so a writer that starts on the id meanwhile (in a new
folder) loses nothing. A 409 ConditionalRequestConflict (two conditional
PUTs in flight at once) is retried. Checkpoints (``area="checkpoints"``) are written in place (no
per-writer folder) because resume reads ``step-<k>/checkpoint.pt`` by its path; two runs of one
training id writing one step at once is the only case that can leave a checkpoint whose bytes do
not match its manifest, and resume refuses that one loudly with the fix.

Publish tells the truth: the only failure a writer swallows is a lost race, i.e. the target id
already holds a valid manifest (ids are content addresses, so it holds what this write would
have). Anything else — permission denied, disk full, a read-only or vanished directory, a target
directory without a valid manifest — raises :class:`PublishError` naming the artifact, the path,
the OS error and the fix, after removing the writer's own staging directory. Training checkpoints
(``area="checkpoints"``) go through the same writer, so there is one publish protocol.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from prefloop.storage.layout import (
    AREAS,
    ARTIFACTS,
    MAIN_TABLE,
    MANIFEST,
    MANIFEST_PUT_ATTEMPTS,
    ROWS_PER_PART,
    WRITER_PREFIX,
    FileEntry,
    Manifest,
    PublishError,
    StoreError,
    TableEntry,
    _now,
    _sha256,
)

if TYPE_CHECKING:
    from prefloop.storage.store import ArtifactStore

def _advice(error: OSError) -> str:
    """How to fix the usual reasons a write into the store fails."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ("the disk or quota holding the store is full: free space (e.g. 'prefloop gc'), or point "
                "PREFLOOP_STORE / --store at a larger disk, then rerun")
    if code in (errno.EACCES, errno.EPERM):
        return "this user may not write there: fix the store directory's permissions or owner, then rerun"
    if code == errno.EROFS:
        return "the store is on a read-only filesystem: point PREFLOOP_STORE / --store at a writable directory"
    if code == errno.ENOENT:
        return ("a directory of the store vanished during the write (removed by hand or another tool?): "
                "check that the store root exists, then rerun")
    return "check the filesystem holding the store (space, permissions, mount), then rerun"


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{error.strerror or error}" + (f" [{name}]" if name else "")


class ArtifactWriter:
    """Collects the tables and files of one artifact, then publishes them atomically.

    Use through :meth:`ArtifactStore.writer`; nothing is visible to readers before
    :meth:`commit` returns. ``area`` is ``artifacts`` (``kind``/``id``) or ``checkpoints`` (there
    ``kind`` is the training run, i.e. its output id, and ``id`` the step directory). Where the
    files go until the manifest publishes them: ``tmp/<id>-<nonce>/`` on a local disk (renamed into
    place), a ``w-<nonce>/`` folder of the artifact's directory on an object store (the manifest's
    ``files_prefix``), the step directory itself for a checkpoint on an object store.
    """

    def __init__(self, store: ArtifactStore, kind: str, artifact_id: str, area: str = ARTIFACTS):
        if area not in AREAS:
            raise ValueError(f"unknown store area '{area}': use one of {', '.join(AREAS)}")
        self.store = store
        self.kind = kind
        self.id = artifact_id
        self.area = area
        self._local = isinstance(store.fs, LocalFileSystem)
        self.final = store._dir(area, kind, artifact_id)
        nonce = uuid.uuid4().hex[:16]
        self.prefix = f"{WRITER_PREFIX}{nonce}" if not self._local and area == ARTIFACTS else ""
        if self._local:
            self.staging = f"{store.base}/tmp/{artifact_id}-{nonce[:8]}"
        else:
            self.staging = f"{self.final}/{self.prefix}" if self.prefix else self.final
        self.tables: dict[str, TableEntry] = {}
        self.files: list[FileEntry] = []
        self.committed: Manifest | None = None
        self._closed = False

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.id}" if self.area == ARTIFACTS else f"{self.area}/{self.kind}/{self.id}"

    def _fail(self, what: str, path: str, error: OSError) -> NoReturn:
        """Remove this write's staging directory, then raise what failed, where, why and the fix."""
        self.abort()
        left = ("this write's staging directory was removed" if self._local or self.prefix else
                "the files written so far have no manifest, so no reader sees them ('prefloop gc' removes them)")
        raise PublishError(
            f"{what} for {self.label} failed at {path}: {_describe(error)}. Nothing was published and "
            f"{left}; {_advice(error)}"
        ) from error

    def _put(self, relpath: str, data: bytes | memoryview) -> FileEntry:
        if self._closed:
            raise StoreError(f"the writer for {self.label} is closed (committed or aborted); open a new one")
        path = f"{self.staging}/{relpath}"
        try:
            if self._local:
                self.store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                with self.store.fs.open(path, "wb") as handle:
                    handle.write(data)
            else:  # one PUT (multipart above s3fs's chunk size): the object appears whole or not at all
                self.store.fs.pipe_file(path, data)
        except OSError as error:
            self._fail(f"writing '{relpath}'", path, error)
        return FileEntry(path=relpath, sha256=_sha256(data), bytes=len(data))

    def write_table(
        self,
        table: pa.Table,
        name: str = MAIN_TABLE,
        schema_id: str | None = None,
        schema_version: int | None = None,
    ) -> TableEntry:
        """Write ``table`` as zstd Parquet parts. The table is written as given: contracts are
        applied by the caller (see ``prefloop.datasets_spec``) before it gets here."""
        if name in self.tables:
            raise StoreError(f"table '{name}' was already written to artifact {self.kind}/{self.id}")
        entries = []
        for part, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_PART)):
            chunk = table.slice(start, ROWS_PER_PART)
            sink = pa.BufferOutputStream()
            pq.write_table(chunk, sink, compression="zstd")
            buffer = sink.getvalue()
            # Local disk: hashed and written straight from Arrow's buffer (no copy); an object store's PUT takes bytes.
            entries.append(self._put(f"{name}/part-{part:05d}.parquet",
                                     memoryview(buffer) if self._local else buffer.to_pybytes()))
        entry = TableEntry(schema_id=schema_id, schema_version=schema_version, rows=table.num_rows, files=entries)
        self.tables[name] = entry
        return entry

    def add_file(self, relpath: str, data: bytes, folder: str = "files") -> FileEntry:
        """Add a plain file (model weights, tokenizer, report) under ``folder`` (``""``: the top)."""
        entry = self._put(f"{folder}/{relpath}" if folder else relpath, data)
        self.files.append(entry)
        return entry

    def add_directory(self, local_dir: str | Path) -> list[FileEntry]:
        root = Path(local_dir)
        added = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            added.append(self.add_file(path.relative_to(root).as_posix(), path.read_bytes()))
        return added

    def commit(self, **manifest_fields: Any) -> Manifest:
        """Write the manifest last and publish; return the published manifest.

        If another writer published the same id first (its manifest is there and valid), this
        write is discarded and theirs is returned: ids are content addresses, so both hold the same
        thing. Any other failure raises :class:`PublishError` and leaves no staging directory."""
        main = self.tables.get(MAIN_TABLE)
        all_files = [f for t in self.tables.values() for f in t.files] + self.files
        manifest = Manifest(
            id=self.id,
            kind=self.kind,
            created_at=_now(),
            schema_id=main.schema_id if main else None,
            schema_version=main.schema_version if main else None,
            rows=main.rows if main else 0,
            bytes=sum(f.bytes for f in all_files),
            tables=self.tables,
            files=self.files,
            files_prefix=self.prefix,
            **manifest_fields,
        )
        body = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True).encode("utf-8")
        if not self._local:
            return self._finish(self._publish_manifest(manifest, body))
        self._put(MANIFEST, body)
        try:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            os.rename(self.staging, self.final)
        except OSError as error:
            existing = self.store._valid_manifest(self.area, self.kind, self.id)
            if existing is None:
                if os.path.isdir(self.final):
                    self.abort()
                    raise PublishError(
                        f"cannot publish {self.label}: {self.final} already exists but holds no valid "
                        f"manifest ({_describe(error)}), so it is a damaged or half-removed write that no "
                        "reader trusts. Delete that directory and rerun; nothing was published"
                    ) from error
                self._fail("publishing (renaming the staging directory into place)", self.final, error)
            # Lost a race to a concurrent writer of the same id: keep theirs, drop ours.
            self.abort()
            return self._finish(existing)
        return self._finish(manifest)

    def _publish_manifest(self, manifest: Manifest, body: bytes) -> Manifest:
        """Object stores: put the manifest only if none is there (``If-None-Match: *``); see the module
        docstring for why this publishes atomically and what happens where the server ignores it."""
        if self._closed:
            raise StoreError(f"the writer for {self.label} is closed (committed or aborted); open a new one")
        path = f"{self.final}/{MANIFEST}"
        for attempt in range(MANIFEST_PUT_ATTEMPTS):
            try:
                self.store.fs.pipe_file(path, body, mode="create")
                return manifest
            except FileExistsError:
                pass  # a manifest is there: judged below
            except OSError as error:
                # 409 ConditionalRequestConflict (another conditional PUT in flight), a timeout …: did a
                # manifest land (ours or theirs)? If not, retry, then give up loudly.
                if self.store._valid_manifest(self.area, self.kind, self.id) is None:
                    if attempt + 1 < MANIFEST_PUT_ATTEMPTS:
                        time.sleep(0.2 * 2**attempt)
                        continue
                    self._fail("publishing (writing the manifest)", path, error)
            existing = self.store._valid_manifest(self.area, self.kind, self.id)
            if existing is None:
                self.abort()
                raise PublishError(
                    f"cannot publish {self.label}: {path} exists but is not a valid manifest, so that "
                    "directory is a damaged write no reader trusts. Delete it (or run 'prefloop gc') and "
                    "rerun; nothing was published"
                )
            if existing.files_prefix == self.prefix and existing.created_at == manifest.created_at:
                return manifest  # ours landed (the answer to a retried PUT was lost)
            # Lost the race: theirs lists only their own complete files; ours are dropped.
            self.abort()
            return existing
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish(self, manifest: Manifest) -> Manifest:
        self.committed = manifest
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Discard this write: its staging directory (object stores: its own folder) is removed; an
        object-store checkpoint written in place keeps its unlisted files for gc."""
        self._closed = True
        if self._local:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.prefix:
            with contextlib.suppress(OSError):
                self.store.fs.rm(self.staging, recursive=True)
