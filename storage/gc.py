"""Garbage collection of the artifact store: what may be removed, and removing it safely while other
processes run stages against the same store.

What gc removes (each a :class:`Removal` with its size in bytes):

- ``artifact``: a published artifact that no *current* ref reaches through lineage. A ref's log
  records every earlier target, but gc keeps only what refs point at now: an earlier target is kept
  only if a current ref still reaches it (re-point a ref at an id to keep it).
- ``incomplete``: a directory under ``artifacts/`` with no manifest (an object-store write that
  never finished, or a removal that was killed midway); no reader trusts it.
- ``staging``: a write in progress under ``tmp/`` that nobody finished.
- ``orphan`` (object stores): the folder of a writer that lost the race to publish an id that
  another writer published (``artifacts/<kind>/<id>/w-<nonce>/`` not named by the manifest's
  ``files_prefix``; see the publish protocol in :mod:`prefloop.storage.writer`).
- ``checkpoints``: a training run's checkpoints whose model is already published (they are
  superseded), or whose newest file is older than the grace period and whose run holds no writer
  lock (see :func:`hold_writer_lock`): the run was abandoned.

Safety against concurrent stages: nothing younger than ``grace_s`` (default 15 minutes) is removed.
A stage publishes its artifact and only then points its ref at it; in between the artifact is
unreferenced, and the grace period is what keeps gc from taking it. Age is measured from the newest
of the manifest's ``created_at`` and the mtimes under the directory (``ArtifactStore.touch`` renews
it for an old artifact a run has just looked up; on object stores it rewrites a ``.used`` marker
object, since an object's time is its last PUT). Refs are read again just before removing, so an
artifact a ref has reached in the meantime stays. Something whose age cannot be read is kept.

Writer locks: on a local disk an ``flock`` on ``.writer.lock``, held while the process lives. Object
stores have no locks, so there the lock is a lease: the holder writes ``.writer.lock`` (owner, host,
pid, ``lease_s``) and a daemon thread rewrites it every ``lease_s / 3``; gc counts the run alive
while the object's last write (the server's ``LastModified``) is younger than its ``lease_s``. A
process that dies stops renewing, and its lease lapses after ``lease_s`` (default 120 s); one that
exits normally deletes it. gc and the writers compare the server's clock with their own, as the grace
period does: keep clocks within a small fraction of ``lease_s`` (NTP does).

On a local store an artifact is removed by renaming it into ``tmp/`` first (one atomic step, so a
reader sees it whole or not at all); elsewhere its manifest goes first, then its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from prefloop.errors import UserError
from prefloop.storage.layout import (
    ARTIFACTS,
    CHECKPOINTS,
    MANIFEST,
    USED_MARKER,
    WRITER_PREFIX,
    ArtifactRef,
    StoreError,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from prefloop.storage.store import ArtifactStore

WRITER_LOCK = ".writer.lock"
REMOVING = "gc-removing-"  # tmp/ entries gc itself renamed out of sight and is deleting
DEFAULT_LEASE_S = 120.0  # object stores: how long a writer lock lives without being renewed


@dataclass(frozen=True)
class Removal:
    """One thing gc removed (or, in a dry run, would remove)."""

    category: str  # artifact | incomplete | staging | checkpoints
    path: str  # relative to the store root, e.g. "artifacts/samples/3f2a…"
    bytes: int
    reason: str
    age_s: float

    def __str__(self) -> str:
        return f"{self.path} ({self.bytes:,} bytes; {self.reason})"


def hold_writer_lock(directory: str, fs: AbstractFileSystem | None = None,
                     lease_s: float = DEFAULT_LEASE_S) -> Any:
    """Take the writer lock of a directory (e.g. a training run's checkpoints) for as long as the
    returned handle lives; while it is held, gc leaves the directory alone whatever its age. The lock
    is released when the handle is garbage collected or the process dies. Returns None when another
    live process already holds it (it protects the directory for both).

    ``fs`` None or local: an ``flock``. Any other filesystem (``store.fs`` of an ``s3://`` store): a
    lease renewed every ``lease_s / 3`` by a daemon thread (see the module docstring)."""
    if fs is not None and not isinstance(fs, LocalFileSystem):
        return _hold_lease(fs, directory, lease_s)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another live process (or a filesystem without flock: gc keeps it anyway)
        os.close(fd)
        return None

    class _Lock:
        pass

    handle = _Lock()
    weakref.finalize(handle, os.close, fd)
    return handle


def _hold_lease(fs: AbstractFileSystem, directory: str, lease_s: float) -> Any:
    if lease_s <= 0:
        raise UserError(f"a writer lock's lease must be > 0 seconds, got {lease_s}")
    path = f"{directory.rstrip('/')}/{WRITER_LOCK}"
    if _lease_alive(fs, path):
        return None  # another live writer renews it; it protects the directory for both
    owner = uuid.uuid4().hex
    body = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "lease_s": lease_s}).encode("utf-8")
    fs.pipe_file(path, body)
    stop = threading.Event()

    def renew() -> None:  # holds no reference to the handle, so the handle can be collected
        while not stop.wait(lease_s / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease covers 3
                fs.pipe_file(path, body)

    threading.Thread(target=renew, name=f"prefloop-lease-{directory.rsplit('/', 1)[-1]}", daemon=True).start()

    class _Lease:
        pass

    handle = _Lease()
    weakref.finalize(handle, _release_lease, stop, fs, path, owner)
    return handle


def _release_lease(stop: threading.Event, fs: AbstractFileSystem, path: str, owner: str) -> None:
    stop.set()
    with contextlib.suppress(Exception):  # best effort: an unreleased lease lapses by itself
        if json.loads(fs.cat_file(path)).get("owner") == owner:
            fs.rm(path)


def _lease_alive(fs: AbstractFileSystem, path: str) -> bool:
    """Whether the lease object at ``path`` was written less than its ``lease_s`` ago."""
    try:
        info = fs.info(path)
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return False
    written = next((t for key in ("LastModified", "mtime", "last_modified", "updated", "created")
                    if (t := _timestamp(info.get(key))) is not None), None)
    if written is None:
        return True  # cannot date it: keep, to be safe
    try:
        lease_s = float(json.loads(raw).get("lease_s", DEFAULT_LEASE_S))
    except (ValueError, TypeError, AttributeError):
        lease_s = DEFAULT_LEASE_S  # damaged: dated by its write time alone
    return time.time() - written < lease_s


def _writer_alive(store: ArtifactStore, directory: str) -> bool:
    if not isinstance(store.fs, LocalFileSystem):
        return _lease_alive(store.fs, f"{directory}/{WRITER_LOCK}")
    try:
        fd = os.open(os.path.join(directory, WRITER_LOCK), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held; or a filesystem where the lock cannot be tested: keep, to be safe
        return True
    finally:
        os.close(fd)  # closing the descriptor also drops the lock just taken
    return False


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _newest(store: ArtifactStore, path: str) -> float | None:
    """The newest modification time of ``path`` and everything under it (None: unknown)."""
    if isinstance(store.fs, LocalFileSystem):
        newest = None
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                with contextlib.suppress(FileNotFoundError):
                    mtime = os.lstat(name).st_mtime
                    newest = mtime if newest is None else max(newest, mtime)
        return newest
    infos = [store.fs.info(path), *store.fs.find(path, withdirs=True, detail=True).values()]
    times = [
        t for info in infos for key in ("mtime", "LastModified", "last_modified", "updated", "created")
        if (t := _timestamp(info.get(key))) is not None
    ]
    return max(times) if times else None


def _size(store: ArtifactStore, path: str) -> int:
    try:
        return int(store.fs.du(path, total=True))
    except OSError:  # removed meanwhile (e.g. by a concurrent gc)
        return 0


def _children(store: ArtifactStore, path: str) -> list[str]:
    if not store.fs.exists(path):
        return []
    return sorted(p.rstrip("/") for p in store.fs.ls(path, detail=False))


def _candidates(store: ArtifactStore, grace_s: float, now: float) -> list[tuple[Removal, str]]:
    keep = store.reachable()  # a damaged ref or reachable manifest raises here: remove nothing then
    published = set(store.list())
    published_ids = {ref.id for ref in published}
    found: list[tuple[Removal, str]] = []

    def consider(category: str, path: str, reason: str, *, created: float | None = None,
                 ignore_age: bool = False) -> None:
        try:
            newest = _newest(store, path)
        except FileNotFoundError:  # removed meanwhile (a concurrent gc, or its run cleared it)
            return
        if created is not None:
            newest = created if newest is None else max(newest, created)
        age = now - newest if newest is not None else 0.0
        if ignore_age or (newest is not None and age >= grace_s):
            relative = path[len(store.base):].lstrip("/")
            found.append((Removal(category, relative, _size(store, path), reason, age), path))

    local = isinstance(store.fs, LocalFileSystem)
    for kind_dir in _children(store, f"{store.base}/{ARTIFACTS}"):
        kind = kind_dir.rsplit("/", 1)[-1]
        for path in _children(store, kind_dir):
            ref = ArtifactRef(kind, path.rsplit("/", 1)[-1])
            if ref in keep:
                if not local:
                    _orphans(store, ref, path, consider)
                continue
            if ref not in published and not store.exists(ref):  # published since the listing: an artifact
                consider("incomplete", path, "no manifest: a write or removal that never finished")
                continue
            try:
                created = _timestamp(store.read_manifest(ref).created_at)
            except StoreError:
                created = None  # a damaged manifest: its files' mtimes date it
            offered = len(found)
            consider("artifact", path, "no ref reaches it", created=created)
            if not local and len(found) == offered:  # kept for now (young): its orphans may still go
                _orphans(store, ref, path, consider)
    for path in _children(store, f"{store.base}/tmp"):
        if path.rsplit("/", 1)[-1].startswith(REMOVING):
            consider("staging", path, "left by a gc that was stopped midway", ignore_age=True)
        else:
            consider("staging", path, "abandoned write")
    for path in _children(store, f"{store.base}/{CHECKPOINTS}"):
        if _writer_alive(store, path):
            continue
        run = path.rsplit("/", 1)[-1]
        if run in published_ids:
            consider("checkpoints", path, "its model is published", ignore_age=True)
        else:
            consider("checkpoints", path, "abandoned training run")
    return found


def _orphans(store: ArtifactStore, ref: ArtifactRef, path: str, consider: Any) -> None:
    """Object stores: offer the writer folders of a published artifact that its manifest does not name."""
    try:
        prefix = store.read_manifest(ref).files_prefix
    except StoreError:
        return  # damaged: 'prefloop validate' reports it; gc does not guess which files are its own
    if not prefix:
        return  # written in place (before per-writer folders): every file is its own
    for child in _children(store, path):
        name = child.rsplit("/", 1)[-1]
        if name.startswith(WRITER_PREFIX) and name != prefix and name not in (MANIFEST, USED_MARKER):
            consider("orphan", child, "a writer that lost the race to publish this id")


def _named_by_manifest(store: ArtifactStore, folder: str) -> bool:
    directory, name = folder.rsplit("/", 1)
    kind_dir, artifact_id = directory.rsplit("/", 1)
    try:
        return store.read_manifest(ArtifactRef(kind_dir.rsplit("/", 1)[-1], artifact_id)).files_prefix == name
    except StoreError:
        return True  # cannot tell: keep it


def _remove(store: ArtifactStore, removal: Removal, path: str) -> None:
    if isinstance(store.fs, LocalFileSystem):
        if removal.category in ("artifact", "incomplete"):
            # One rename takes the artifact out of sight whole; the slow delete happens in tmp/.
            doomed = f"{store.base}/tmp/{REMOVING}{path.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:8]}"
            os.makedirs(os.path.dirname(doomed), exist_ok=True)
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return
            path = doomed
        shutil.rmtree(path, ignore_errors=True)
        return
    # No rename on object stores: list first, then the manifest goes, so no reader takes the rest for an
    # artifact; then exactly the listed objects go. A writer that starts on this id once the manifest is
    # gone writes into a new w-<nonce>/ folder, which is not in the listing, so gc never deletes a file
    # a new manifest will list (a recursive delete of the directory could).
    try:
        listed = store.fs.find(path)
    except FileNotFoundError:
        return
    manifest = f"{path}/{MANIFEST}"
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm_file(manifest)
    rest = [p for p in listed if p.rstrip("/") != manifest]
    with contextlib.suppress(FileNotFoundError):
        if rest:
            store.fs.rm(rest)
    # Filesystems with directories of their own (memory://) keep empty ones; S3 has none left.
    with contextlib.suppress(OSError):
        if store.fs.exists(path) and not store.fs.find(path):
            store.fs.rm(path, recursive=True)


def collect(store: ArtifactStore, *, dry_run: bool, grace_s: float) -> list[Removal]:
    """Find (and unless ``dry_run`` remove) what gc may remove; see the module docstring."""
    if grace_s < 0:
        raise UserError(f"grace_s must be >= 0 seconds, got {grace_s}")
    found = _candidates(store, grace_s, time.time())
    if dry_run or not found:
        return [removal for removal, _ in found]
    keep = store.reachable()  # refs set since the scan began win over the scan
    removed = []
    for removal, path in found:
        if removal.category == "artifact" and ArtifactRef(*removal.path.split("/")[1:]) in keep:
            continue
        if removal.category == "checkpoints" and _writer_alive(store, path):
            continue  # a run (re)started since the scan
        if removal.category == "orphan" and _named_by_manifest(store, path):
            continue  # its writer's manifest landed since the scan (a server without conditional writes)
        _remove(store, removal, path)
        removed.append(removal)
    return removed


__all__ = ["WRITER_LOCK", "Removal", "collect", "hold_writer_lock"]
