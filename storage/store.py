"""The artifact store: immutable, content-addressed artifacts on any fsspec filesystem — the verified read
path, refs with their log, and the entry points of writing (:meth:`ArtifactStore.writer`) and gc.

Where things go under the root and what a manifest records: :mod:`prefloop.storage.layout`. How a write is
staged and published so that a reader never sees half an artifact, on a local disk and on object stores:
:mod:`prefloop.storage.writer`. What gc may remove, and how it stays safe next to running stages:
:mod:`prefloop.storage.gc`.

On object stores the filesystem is opened with ``use_listings_cache=False``: other processes
write to the same bucket, and a cached listing would hide what they published. Endpoint and
credentials come from the environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` …, or
``~/.aws``), never from the store URI: a URI with ``user:password@`` is refused, so no key can
reach a manifest, a ref log or a report (see docs/s3.md).

Over 400 lines: the verified read path (checksums, the local cache of verified files), refs with their log and
the lookups that resolve names all work on one layout and one verification state, so they stay in one class.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from prefloop.errors import UserError
from prefloop.storage.layout import (
    ARTIFACTS,
    CHECKPOINTS,
    DEFAULT_GC_GRACE_S,
    DEFAULT_STORE,
    MAIN_TABLE,
    MANIFEST,
    OBJECT_STORES,
    USED_MARKER,
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRef,
    FileEntry,
    Manifest,
    PublishError,
    StoreError,
    TableEntry,
    TamperedArtifactError,
    _now,
    _sha256,
)
from prefloop.storage.writer import ArtifactWriter

if TYPE_CHECKING:
    from prefloop.storage.gc import Removal


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


# CHECKPOINTS stays importable from here: tasks/training/artifacts.py imports it so, and editing that import
# would change the train stage's code identity (and so every trained artifact's id) for no change in what it computes.
__all__ = [
    "CHECKPOINTS",
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
