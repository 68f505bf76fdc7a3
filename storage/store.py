"""The artifact store: immutable, content-addressed artifacts on any fsspec filesystem.

Layout under the root (a local path, ``file://``, ``memory://``, ``s3://`` …)::

    artifacts/<kind>/<id>/manifest.json        written last: the commit marker
    artifacts/<kind>/<id>/data/part-00000.parquet   the artifact's main table (zstd)
    artifacts/<kind>/<id>/<table>/part-*.parquet    further tables (e.g. ``drops``)
    artifacts/<kind>/<id>/files/...             plain files (model weights, tokenizer)
    refs/<name>.json                            human name -> artifact, with the log of moves
    tmp/<id>-<nonce>/                           writes in progress (ignored, cleaned by gc)

Readers trust an artifact only when its manifest exists and every file's sha256 matches it.
On a local filesystem a write goes to ``tmp/`` and is published with one atomic rename; on
object stores, which have no directory rename, files land in place and the manifest, written
last, publishes them. Either way a write killed midway leaves nothing a reader can see.

Over 400 lines: the writer (staging, checksums, the publish protocol), the verified read path, refs
with their log and gc are one consistency protocol over one layout; they change together, so they
stay in one module.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field

from prefloop import __version__ as CODE_VERSION

DEFAULT_STORE = "./.prefloop/store"
MAIN_TABLE = "data"
ROWS_PER_PART = 1_000_000


class StoreError(Exception):
    """Base class of the store's errors; each message says what, why and how to fix."""


class ArtifactNotFoundError(StoreError):
    pass


class TamperedArtifactError(StoreError):
    pass


class ArtifactExistsError(StoreError):
    pass


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
            raise ValueError(f"'{text}' is not an artifact reference of the form kind/id")
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

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.kind, self.id)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ArtifactWriter:
    """Collects the tables and files of one artifact, then publishes them atomically.

    Use through :meth:`ArtifactStore.writer`; nothing is visible to readers before
    :meth:`commit` returns.
    """

    def __init__(self, store: ArtifactStore, kind: str, artifact_id: str):
        self.store = store
        self.kind = kind
        self.id = artifact_id
        self._local = isinstance(store.fs, LocalFileSystem)
        final = store._artifact_dir(ArtifactRef(kind, artifact_id))
        self.staging = (
            f"{store.base}/tmp/{artifact_id}-{uuid.uuid4().hex[:8]}" if self._local else final
        )
        self.tables: dict[str, TableEntry] = {}
        self.files: list[FileEntry] = []
        self.committed: Manifest | None = None

    def _put(self, relpath: str, data: bytes) -> FileEntry:
        path = f"{self.staging}/{relpath}"
        self.store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.store.fs.open(path, "wb") as handle:
            handle.write(data)
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
            entries.append(self._put(f"{name}/part-{part:05d}.parquet", sink.getvalue().to_pybytes()))
        entry = TableEntry(schema_id=schema_id, schema_version=schema_version, rows=table.num_rows, files=entries)
        self.tables[name] = entry
        return entry

    def add_file(self, relpath: str, data: bytes) -> FileEntry:
        """Add a plain file (model weights, tokenizer, report) under ``files/``."""
        entry = self._put(f"files/{relpath}", data)
        self.files.append(entry)
        return entry

    def add_directory(self, local_dir: str | Path) -> list[FileEntry]:
        root = Path(local_dir)
        added = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            added.append(self.add_file(path.relative_to(root).as_posix(), path.read_bytes()))
        return added

    def commit(self, **manifest_fields: Any) -> Manifest:
        """Write the manifest last and publish. If another writer published the same id first,
        this write is discarded: ids are content addresses, so both hold the same thing."""
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
            **manifest_fields,
        )
        body = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True).encode("utf-8")
        self._put("manifest.json", body)
        if self._local:
            final = self.store._artifact_dir(manifest.ref)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(self.staging, final)
            except OSError:
                # Lost a race to a concurrent writer of the same content: keep theirs.
                shutil.rmtree(self.staging, ignore_errors=True)
        self.committed = manifest
        return manifest

    def abort(self) -> None:
        if self._local:
            shutil.rmtree(self.staging, ignore_errors=True)


class ArtifactStore:
    """Immutable, content-addressed artifacts plus human-readable refs."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        root = str(root or os.environ.get("PREFLOOP_STORE") or DEFAULT_STORE)
        self.root = root
        self.fs, base = url_to_fs(root)
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
    def _artifact_dir(self, ref: ArtifactRef) -> str:
        return f"{self.base}/artifacts/{ref.kind}/{ref.id}"

    def _ref_path(self, name: str) -> str:
        return f"{self.base}/refs/{name}.json"

    # -- writing -------------------------------------------------------------------------------
    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(f"{self._artifact_dir(ref)}/manifest.json")

    @contextlib.contextmanager
    def writer(self, kind: str, artifact_id: str) -> Iterator[ArtifactWriter]:
        """Open a writer for a new artifact. An exception inside the block discards the write."""
        if self.exists(ArtifactRef(kind, artifact_id)):
            raise ArtifactExistsError(
                f"artifact {kind}/{artifact_id} already exists and artifacts are immutable; "
                "check store.exists(ref) first (a stage re-run with the same inputs is a lookup)"
            )
        writer = ArtifactWriter(self, kind, artifact_id)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        if writer.committed is None:
            writer.abort()
            raise StoreError(f"writer for {kind}/{artifact_id} closed without commit(); nothing was published")

    # -- reading -------------------------------------------------------------------------------
    def read_manifest(self, ref: ArtifactRef) -> Manifest:
        path = f"{self._artifact_dir(ref)}/manifest.json"
        try:
            with self.fs.open(path, "rb") as handle:
                data = json.loads(handle.read())
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"artifact {ref} is not in the store at {self.root}: run 'prefloop ls' to see what is there"
            ) from None
        return Manifest.model_validate(data)

    def _read_verified(self, ref: ArtifactRef, entry: FileEntry) -> bytes:
        path = f"{self._artifact_dir(ref)}/{entry.path}"
        try:
            with self.fs.open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
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
                self._read_verified(ref, entry)
        for entry in manifest.files:
            self._read_verified(ref, entry)
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
            pq.read_table(pa.BufferReader(self._read_verified(ref, entry)))
            for entry in manifest.tables[name].files
        ]
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def read_file(self, ref: ArtifactRef, relpath: str) -> bytes:
        manifest = self.read_manifest(ref)
        for entry in manifest.files:
            if entry.path == f"files/{relpath}":
                return self._read_verified(ref, entry)
        raise StoreError(f"artifact {ref} has no file '{relpath}'")

    def local_files(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's verified ``files/`` (e.g. a model to load).

        Local stores hand out the artifact's own directory after checking every checksum; other
        filesystems are copied once into a per-id cache.
        """
        if isinstance(self.fs, LocalFileSystem):
            if str(ref) not in self._verified:
                self.verify(ref)
            return Path(self._artifact_dir(ref)) / "files"
        cache = Path(tempfile.gettempdir()) / "prefloop-cache" / ref.kind / ref.id
        if not (cache / ".complete").exists():
            staging = cache.with_name(f"{ref.id}.{uuid.uuid4().hex[:6]}")
            manifest = self.read_manifest(ref)
            for entry in manifest.files:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._read_verified(ref, entry))
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
        try:
            with self.fs.open(self._ref_path(name), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

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
        seen: set[ArtifactRef] = set()
        stack = list(self.refs().values())
        while stack:
            ref = stack.pop()
            if ref in seen or not self.exists(ref):
                continue
            seen.add(ref)
            stack.extend(ArtifactRef.parse(t) for t in self.read_manifest(ref).inputs.values())
        return seen

    def gc(self, dry_run: bool = False, tmp_older_than_s: float = 3600.0) -> list[str]:
        """Remove artifacts no ref reaches (through lineage) and stale temporary writes."""
        keep = self.reachable()
        removed = [str(r) for r in self.list() if r not in keep]
        tmp = f"{self.base}/tmp"
        stale = []
        if self.fs.exists(tmp):
            for path in self.fs.ls(tmp, detail=True):
                modified = path.get("mtime") or path.get("created") or 0
                if hasattr(modified, "timestamp"):
                    modified = modified.timestamp()
                if time.time() - float(modified) > tmp_older_than_s:
                    stale.append(path["name"])
        if not dry_run:
            for text in removed:
                self.fs.rm(self._artifact_dir(ArtifactRef.parse(text)), recursive=True)
            for path in stale:
                self.fs.rm(path, recursive=True)
        return removed + [f"tmp/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in stale]


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
    "StoreError",
    "TableEntry",
    "TamperedArtifactError",
    "open_store",
]
