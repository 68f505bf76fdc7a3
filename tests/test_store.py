"""The artifact store: atomic publish, immutability, checksums, refs, gc, other filesystems."""

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from prefloop.storage import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRef,
    ArtifactStore,
    StoreError,
    TamperedArtifactError,
    fingerprint,
)
from prefloop.storage.fingerprint import UnhashableConfigError


def write(store: ArtifactStore, artifact_id: str = "a1b2c3d4", rows: int = 3, kind: str = "samples", inputs=None):
    with store.writer(kind, artifact_id) as writer:
        writer.write_table(pa.table({"x": list(range(rows))}), schema_id="test", schema_version=1)
        writer.add_file("weights.bin", b"\x00\x01")
        return writer.commit(stage="test", stage_version="1", inputs=inputs or {})


def test_publish_then_read_back(store):
    manifest = write(store)
    assert store.exists(manifest.ref)
    assert store.read_table(manifest.ref).column("x").to_pylist() == [0, 1, 2]
    assert manifest.rows == 3 and manifest.tables["data"].files[0].sha256
    on_disk = json.loads((Path(store.base) / "artifacts/samples/a1b2c3d4/manifest.json").read_text())
    assert on_disk["id"] == "a1b2c3d4" and on_disk["tables"]["data"]["rows"] == 3
    assert list((Path(store.base) / "tmp").iterdir()) == []  # staging dir moved into place


def test_existing_id_is_never_overwritten(store):
    write(store, rows=3)
    with pytest.raises(ArtifactExistsError, match="immutable"):
        write(store, rows=5)
    assert store.read_table(ArtifactRef("samples", "a1b2c3d4")).num_rows == 3


def test_tampered_file_is_refused(store):
    manifest = write(store)
    part = Path(store.base) / "artifacts/samples/a1b2c3d4" / manifest.tables["data"].files[0].path
    part.write_bytes(part.read_bytes()[:-3] + b"xyz")
    with pytest.raises(TamperedArtifactError, match="sha256"):
        store.read_table(manifest.ref)
    with pytest.raises(TamperedArtifactError):
        store.verify(manifest.ref)


def test_missing_file_is_refused(store):
    manifest = write(store)
    (Path(store.base) / "artifacts/samples/a1b2c3d4/files/weights.bin").unlink()
    with pytest.raises(TamperedArtifactError, match="missing"):
        store.verify(manifest.ref)


def test_exception_inside_writer_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.writer("samples", "deadbeef") as writer:
            writer.write_table(pa.table({"x": [1]}))
            raise RuntimeError("stage crashed")
    assert not store.exists(ArtifactRef("samples", "deadbeef"))
    assert store.list() == []


def test_write_killed_midway_leaves_nothing_visible(store):
    """A process SIGKILLed between writing data and committing leaves only a tmp dir that gc cleans."""
    script = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from prefloop.storage import ArtifactStore
        store = ArtifactStore({store.base!r})
        with store.writer("samples", "cafe0001") as w:
            w.write_table(pa.table({{"x": list(range(1000))}}))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not store.exists(ArtifactRef("samples", "cafe0001"))
    assert store.list() == []
    leftovers = list((Path(store.base) / "tmp").iterdir())
    assert len(leftovers) == 1  # the half-written staging dir, invisible to readers
    assert store.gc() == []  # younger than the grace period: it could be a live writer's
    assert [r.path for r in store.gc(grace_s=0)] == [f"tmp/{leftovers[0].name}"]
    assert list((Path(store.base) / "tmp").iterdir()) == []


def test_unfinished_writer_publishes_nothing(store):
    with pytest.raises(StoreError, match="without commit"):
        with store.writer("samples", "beef0002") as writer:
            writer.write_table(pa.table({"x": [1]}))
    assert store.list() == []


def test_refs_log_every_move_and_resolve(store):
    first = write(store, "11112222").ref
    second = write(store, "33334444").ref
    store.set_ref("demo/round-1/samples", first)
    store.set_ref("demo/round-1/samples", second, note="re-run")
    assert store.resolve("demo/round-1/samples") == second
    assert [e["target"] for e in store.ref_log("demo/round-1/samples")] == [str(first), str(second)]
    assert store.resolve("samples/11112222") == first
    assert store.resolve("1111") == first
    assert store.refs("demo/") == {"demo/round-1/samples": second}
    with pytest.raises(ArtifactNotFoundError, match="prefloop ls"):
        store.resolve("demo/round-9/samples")
    with pytest.raises(StoreError, match="not a valid ref name"):
        store.set_ref("../escape", first)


def test_gc_keeps_what_refs_reach_through_lineage(store):
    parent = write(store, "aaaa0000").ref
    child = write(store, "bbbb0000", inputs={"samples": str(parent)}).ref
    orphan = write(store, "cccc0000").ref
    store.set_ref("run/child", child)
    orphan_path = f"artifacts/{orphan}"
    assert [r.path for r in store.gc(dry_run=True, grace_s=0)] == [orphan_path]
    assert store.exists(orphan)
    assert [r.path for r in store.gc(grace_s=0)] == [orphan_path]
    assert not store.exists(orphan) and store.exists(parent) and store.exists(child)


def test_memory_filesystem_uses_the_same_code():
    store = ArtifactStore(f"memory://prefloop-test-{uuid.uuid4().hex[:6]}")
    manifest = write(store)
    assert store.read_table(manifest.ref).num_rows == 3
    assert store.local_files(manifest.ref).joinpath("weights.bin").read_bytes() == b"\x00\x01"
    store.set_ref("run/x", manifest.ref)
    assert store.resolve("run/x") == manifest.ref


def test_store_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLOOP_STORE", str(tmp_path / "env-store"))
    assert ArtifactStore().base == str(tmp_path / "env-store")


def test_fingerprint_covers_config_inputs_and_version():
    base = fingerprint("filter", "1", {"min_margin": 0.0}, {"preferences": "preferences/x"})
    assert base == fingerprint("filter", "1", {"min_margin": 0.0}, {"preferences": "preferences/x"})
    assert base != fingerprint("filter", "2", {"min_margin": 0.0}, {"preferences": "preferences/x"})
    assert base != fingerprint("filter", "1", {"min_margin": 0.1}, {"preferences": "preferences/x"})
    assert base != fingerprint("filter", "1", {"min_margin": 0.0}, {"preferences": "preferences/y"})
    with pytest.raises(UnhashableConfigError, match="config.fn"):
        fingerprint("filter", "1", {"fn": object()}, {})


