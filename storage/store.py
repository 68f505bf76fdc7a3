"""The artifact store: immutable, content-addressed artifacts on any fsspec filesystem.

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

On object stores the filesystem is opened with ``use_listings_cache=False``: other processes
write to the same bucket, and a cached listing would hide what they published. Endpoint and
credentials come from the environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` …, or
``~/.aws``), never from the store URI: a URI with ``user:password@`` is refused, so no key can
reach a manifest, a ref log or a report (see docs/s3.md).

Publish tells the truth: the only failure a writer swallows is a lost race, i.e. the target id
already holds a valid manifest (ids are content addresses, so it holds what this write would
have). Anything else — permission denied, disk full, a read-only or vanished directory, a target
directory without a valid manifest — raises :class:`PublishError` naming the artifact, the path,
the OS error and the fix, after removing the writer's own staging directory. Training checkpoints
(``area="checkpoints"``) go through the same writer, so there is one publish protocol.

Over 400 lines: the writer (staging, checksums, the publish protocol), the verified read path and
refs with their log are one consistency protocol over one layout; they change together, so they
stay in one module. What gc may remove, and how it stays safe next to running stages, is
``prefloop.storage.gc``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field

from prefloop import __version__ as CODE_VERSION
from prefloop.errors import UserError

if TYPE_CHECKING:
    from prefloop.storage.gc import Removal

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
        "object stores (see the publish protocol in prefloop.storage.store); empty: the directory itself")
    code: dict[str, Any] = Field(default_factory=dict, description="the code fingerprint of the stage that made it, "
                                 "the one its id used, and the module hashes it is made of")

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.kind, self.id)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


class ArtifactStore:
    """Immutable, content-addressed artifacts plus human-readable refs."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        root = str(root or os.environ.get("PREFLOOP_STORE") or DEFAULT_STORE)
        protocol, rest = split_protocol(root)
        if protocol and "@" in rest.split("/", 1)[0]:
            raise UserError(
                f"the store URI '{protocol}://…@{rest.split('@', 1)[1]}' carries credentials before '@'; they "
                "would be written into every manifest, ref log and report that names the store. Remove them "
                "from the URI and give them the standard way instead: AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, an instance role), and the "
                "endpoint of a non-AWS server in AWS_ENDPOINT_URL_S3 (see docs/s3.md)"
            )
        self.root = root
        # Other processes publish into the same bucket: a cached listing would hide their artifacts.
        options = {"use_listings_cache": False} if protocol in OBJECT_STORES else {}
        self.fs, base = url_to_fs(root, **options)
        self.base = base.rstrip("/") or "/"
        self._verified: set[str] = set()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    @property
    def uri(self) -> str:
        """A string that reopens this store in another process."""
        if isinstance(self.fs, LocalFileSystem):
            return self.base
        return self.root

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, area: str, kind: str, artifact_id: str) -> str:
        return f"{self.base}/{area}/{kind}/{artifact_id}"

    def _artifact_dir(self, ref: ArtifactRef) -> str:
        return self._dir(ARTIFACTS, ref.kind, ref.id)

    def _files_dir(self, ref: ArtifactRef, manifest: Manifest, area: str = ARTIFACTS) -> str:
        """Where the files a manifest lists are: its writer's folder (object stores) or the directory."""
        directory = self._dir(area, ref.kind, ref.id)
        return f"{directory}/{manifest.files_prefix}" if manifest.files_prefix else directory

    def _ref_path(self, name: str) -> str:
        return f"{self.base}/refs/{name}.json"

    # -- writing -------------------------------------------------------------------------------
    def exists(self, ref: ArtifactRef, area: str = ARTIFACTS) -> bool:
        return self.fs.exists(f"{self._dir(area, ref.kind, ref.id)}/{MANIFEST}")

    @contextlib.contextmanager
    def writer(self, kind: str, artifact_id: str, area: str = ARTIFACTS) -> Iterator[ArtifactWriter]:
        """Open a writer for a new artifact (or checkpoint: ``area="checkpoints"``). An exception
        inside the block discards the write."""
        if self.exists(ArtifactRef(kind, artifact_id), area):
            raise ArtifactExistsError(
                f"{area[:-1]} {kind}/{artifact_id} already exists and artifacts are immutable; "
                "check store.exists(ref) first (a stage re-run with the same inputs is a lookup)"
            )
        writer = ArtifactWriter(self, kind, artifact_id, area)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        if writer.committed is None:
            writer.abort()
            raise StoreError(f"writer for {kind}/{artifact_id} closed without commit(); nothing was published")

    # -- reading -------------------------------------------------------------------------------
    def read_manifest(self, ref: ArtifactRef, area: str = ARTIFACTS) -> Manifest:
        path = f"{self._dir(area, ref.kind, ref.id)}/{MANIFEST}"
        try:
            with self.fs.open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"{area[:-1]} {ref} is not in the store at {self.root}: run 'prefloop ls' to see what is there"
            ) from None
        try:
            manifest = Manifest.model_validate(json.loads(raw))
        except ValueError as error:  # not JSON, or not a manifest
            raise TamperedArtifactError(
                f"{area[:-1]} {ref} is damaged: {path} is not a valid manifest ({str(error).splitlines()[0]}); "
                "nothing in it can be trusted — delete its directory and re-run the stage that made it"
            ) from None
        if (manifest.kind, manifest.id) != (ref.kind, ref.id):
            raise TamperedArtifactError(
                f"{area[:-1]} {ref} is damaged: its manifest at {path} describes {manifest.ref}; delete its "
                "directory and re-run the stage that made it"
            )
        return manifest

    def _valid_manifest(self, area: str, kind: str, artifact_id: str) -> Manifest | None:
        """The manifest at that place if it is there and valid, else None (a lost race needs one)."""
        try:
            return self.read_manifest(ArtifactRef(kind, artifact_id), area)
        except (StoreError, OSError):
            return None

    def touch(self, ref: ArtifactRef) -> None:
        """Mark an artifact as just used, so gc's grace period protects an old, unreferenced artifact
        that a run has just looked up and is about to point a ref at: the manifest's mtime on a local
        disk; on object stores, whose objects' times cannot change without a rewrite (and the manifest
        is never rewritten), a small marker object beside it (``.used``) that gc dates the artifact by."""
        # A read-only store (or bucket policy) has no gc running against it: nothing to protect.
        with contextlib.suppress(OSError):
            if isinstance(self.fs, LocalFileSystem):
                now = time.time()
                os.utime(f"{self._artifact_dir(ref)}/{MANIFEST}", (now, now))
            else:
                self.fs.pipe_file(f"{self._artifact_dir(ref)}/{USED_MARKER}", _now().encode())

    def _read_verified(self, ref: ArtifactRef, entry: FileEntry, manifest: Manifest) -> bytes:
        path = f"{self._files_dir(ref, manifest)}/{entry.path}"
        try:
            with self.fs.open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            if not self.exists(ref):  # its manifest went too: removed while this read it, not damaged
                raise ArtifactNotFoundError(
                    f"artifact {ref} was removed from {self.root} while it was being read (a concurrent "
                    "'prefloop gc' takes an artifact no ref reaches once it is older than the grace period); "
                    "rerun the stage that made it, and point a ref at what you read to keep it"
                ) from None
            raise TamperedArtifactError(
                f"artifact {ref} is damaged: file '{entry.path}' listed in its manifest is missing; "
                "the artifact cannot be trusted — delete it and re-run the stage that made it"
            ) from None
        digest = _sha256(data)
        if digest != entry.sha256 or len(data) != entry.bytes:
            raise TamperedArtifactError(
                f"artifact {ref} is damaged: '{entry.path}' has sha256 {digest[:12]}… but its manifest "
                f"says {entry.sha256[:12]}…; the file changed after it was written. Delete the artifact "
                f"directory and re-run the stage that made it (see 'prefloop lineage {ref}')"
            )
        return data

    def verify(self, ref: ArtifactRef) -> Manifest:
        """Check every file of the artifact against its manifest; raise if any differs."""
        manifest = self.read_manifest(ref)
        for table in manifest.tables.values():
            for entry in table.files:
                self._read_verified(ref, entry, manifest)
        for entry in manifest.files:
            self._read_verified(ref, entry, manifest)
        self._verified.add(str(ref))
        return manifest

    def read_table(self, ref: ArtifactRef, name: str = MAIN_TABLE) -> pa.Table:
        """Read one table of an artifact, verifying each file's checksum as it is read."""
        manifest = self.read_manifest(ref)
        if name not in manifest.tables:
            raise StoreError(
                f"artifact {ref} has no table '{name}' (it has: {', '.join(manifest.tables) or 'none'})"
            )
        parts = [
            pq.read_table(pa.BufferReader(self._read_verified(ref, entry, manifest)))
            for entry in manifest.tables[name].files
        ]
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def read_file(self, ref: ArtifactRef, relpath: str) -> bytes:
        manifest = self.read_manifest(ref)
        for entry in manifest.files:
            if entry.path == f"files/{relpath}":
                return self._read_verified(ref, entry, manifest)
        raise StoreError(f"artifact {ref} has no file '{relpath}'")

    def local_files(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's verified ``files/`` (e.g. a model to load).

        Local stores hand out the artifact's own directory after checking every checksum; other
        filesystems are copied once into a per-id cache.
        """
        if isinstance(self.fs, LocalFileSystem):
            manifest = self.verify(ref) if str(ref) not in self._verified else self.read_manifest(ref)
            return Path(self._files_dir(ref, manifest)) / "files"
        cache = Path(tempfile.gettempdir()) / "prefloop-cache" / ref.kind / ref.id
        if not (cache / ".complete").exists():
            staging = cache.with_name(f"{ref.id}.{uuid.uuid4().hex[:6]}")
            manifest = self.read_manifest(ref)
            for entry in manifest.files:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._read_verified(ref, entry, manifest))
            (staging / ".complete").touch()
            shutil.rmtree(cache, ignore_errors=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, cache)
        return cache / "files"

    def list(self, kind: str | None = None) -> list[ArtifactRef]:
        """All published artifacts (those with a manifest), sorted by kind then id."""
        base = f"{self.base}/artifacts"
        if not self.fs.exists(base):
            return []
        kinds = [kind] if kind else [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        refs = []
        for k in kinds:
            kdir = f"{base}/{k}"
            if not self.fs.exists(kdir):
                continue
            for path in self.fs.ls(kdir, detail=False):
                ref = ArtifactRef(k, path.rstrip("/").rsplit("/", 1)[-1])
                if self.exists(ref):
                    refs.append(ref)
        return sorted(refs)

    # -- refs ----------------------------------------------------------------------------------
    @staticmethod
    def check_ref_name(name: str) -> None:
        """Refuse a ref name that is empty, has '.'/'..' parts or ends in '.json' (it must stay inside refs/)."""
        ArtifactStore._check_ref_name(name)

    @staticmethod
    def _check_ref_name(name: str) -> None:
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts) or name.endswith(".json"):
            raise StoreError(
                f"'{name}' is not a valid ref name: use slash-separated words such as 'demo/round-1/preferences'"
            )

    def set_ref(self, name: str, ref: ArtifactRef, note: str = "") -> None:
        """Point ``name`` at ``ref``; every move is appended to the ref's log."""
        self._check_ref_name(name)
        if not self.exists(ref):
            raise ArtifactNotFoundError(f"cannot point ref '{name}' at {ref}: no such artifact in {self.root}")
        current = self._read_ref_doc(name)
        if current and current["target"] == str(ref):
            return
        log = (current or {}).get("log", [])
        log.append({"target": str(ref), "at": _now(), "note": note})
        doc = {"name": name, "target": str(ref), "log": log}
        path = self._ref_path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        body = json.dumps(doc, indent=2).encode("utf-8")
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)

    def _read_ref_doc(self, name: str) -> dict[str, Any] | None:
        path = self._ref_path(name)
        try:
            with self.fs.open(path, "rb") as handle:
                doc = json.loads(handle.read())
            ArtifactRef.parse(doc["target"])
            return doc
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(
                f"ref '{name}' is damaged: {path} is not a valid ref file ({error}); restore it from a "
                "backup or delete it (and point the name again with a run or 'prefloop stage --name')"
            ) from None

    def ref_log(self, name: str) -> list[dict[str, Any]]:
        doc = self._read_ref_doc(name)
        if doc is None:
            raise ArtifactNotFoundError(f"no ref named '{name}' in {self.root}")
        return doc["log"]

    def refs(self, prefix: str = "") -> dict[str, ArtifactRef]:
        """Ref name -> target, for every ref whose name starts with ``prefix``."""
        base = f"{self.base}/refs"
        if not self.fs.exists(base):
            return {}
        found = {}
        for path in self.fs.find(base):
            if not path.endswith(".json"):
                continue
            name = path.split("/refs/", 1)[1][: -len(".json")]
            if name.startswith(prefix):
                doc = self._read_ref_doc(name)
                if doc:
                    found[name] = ArtifactRef.parse(doc["target"])
        return dict(sorted(found.items()))

    def resolve(self, text: str) -> ArtifactRef:
        """Turn a ref name, ``kind/id``, an id, or a unique id prefix into an artifact ref."""
        text = text.strip()
        doc = self._read_ref_doc(text) if text and ".." not in text else None
        if doc:
            return ArtifactRef.parse(doc["target"])
        if text.count("/") == 1:
            ref = ArtifactRef.parse(text)
            if self.exists(ref):
                return ref
        if "/" not in text and len(text) >= 4:
            matches = [r for r in self.list() if r.id.startswith(text)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(f"'{text}' matches {len(matches)} artifacts: give more characters of the id")
        raise ArtifactNotFoundError(
            f"'{text}' is neither a ref nor an artifact id in the store at {self.root}; "
            "run 'prefloop ls' to list refs and artifacts"
        )

    # -- lineage and garbage collection ---------------------------------------------------------
    def lineage(self, ref: ArtifactRef) -> dict[str, Any]:
        """The tree of inputs behind an artifact: {ref, stage, inputs: {role: subtree}}."""
        manifest = self.read_manifest(ref)
        return {
            "ref": str(ref),
            "stage": f"{manifest.stage}@{manifest.stage_version}",
            "rows": manifest.rows,
            "inputs": {
                role: self.lineage(ArtifactRef.parse(target)) for role, target in sorted(manifest.inputs.items())
            },
        }

    def reachable(self) -> set[ArtifactRef]:
        """Artifacts the current refs reach through lineage (earlier targets in ref logs are not kept)."""
        seen: set[ArtifactRef] = set()
        stack = list(self.refs().values())
        while stack:
            ref = stack.pop()
            if ref in seen or not self.exists(ref):
                continue
            seen.add(ref)
            stack.extend(ArtifactRef.parse(t) for t in self.read_manifest(ref).inputs.values())
        return seen

    def gc(self, dry_run: bool = False, grace_s: float = DEFAULT_GC_GRACE_S) -> list[Removal]:
        """Remove what no current ref reaches, abandoned writes and abandoned checkpoints, sparing
        anything younger than ``grace_s``; return what was (``dry_run``: would be) removed, with sizes.
        See :mod:`prefloop.storage.gc` for the rules."""
        from prefloop.storage.gc import collect

        return collect(self, dry_run=dry_run, grace_s=grace_s)


def open_store(root: str | os.PathLike[str] | None = None) -> ArtifactStore:
    return ArtifactStore(root)


__all__ = [
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactWriter",
    "FileEntry",
    "Manifest",
    "PublishError",
    "StoreError",
    "TableEntry",
    "TamperedArtifactError",
    "open_store",
]
