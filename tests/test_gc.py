"""Safe gc: next to a stage in another process that has published but not yet set its ref, gc keeps the
artifact (grace period); it cleans abandoned checkpoints and staging dirs; a dry run lists sizes and
removes nothing; a damaged ref stops it before it removes anything."""

import gc as python_gc
import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from prefloop.storage import ArtifactRef, ArtifactStore, StoreError
from prefloop.storage.gc import hold_writer_lock


def publish(store: ArtifactStore, artifact_id: str, rows: int = 3):
    with store.writer("samples", artifact_id) as writer:
        writer.write_table(pa.table({"x": list(range(rows))}))
        return writer.commit(stage="test", stage_version="1")


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_gc_in_one_process_keeps_what_another_published_but_has_not_referenced_yet(store):
    """The stage process publishes two artifacts, then waits before setting its ref; gc runs then.
    Within the grace period both survive (so the ref can be set); after it, the unreferenced one goes."""
    stage = textwrap.dedent(f"""
        import sys, pyarrow as pa
        from prefloop.storage import ArtifactStore
        store = ArtifactStore({store.base!r})
        for artifact_id in ("0utput00", "0rphan00"):
            with store.writer("samples", artifact_id) as writer:
                writer.write_table(pa.table({{"x": [1, 2, 3]}}))
                writer.commit(stage="test", stage_version="1")
        print("published", flush=True)
        sys.stdin.readline()  # gc runs now, before the ref is set
        store.set_ref("run/round-1/samples", store.resolve("samples/0utput00"))
        print("ref set", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", stage], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "published"
        assert store.gc() == []  # default grace: both are moments old
        out, err = process.communicate("go\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "ref set" in out
    removed = store.gc(grace_s=0)  # "after the grace period"
    assert [r.path for r in removed] == ["artifacts/samples/0rphan00"]
    assert store.resolve("run/round-1/samples") == ArtifactRef("samples", "0utput00")
    assert not store.exists(ArtifactRef("samples", "0rphan00"))


def plant_leftovers(store: ArtifactStore) -> dict[str, Path]:
    """One of each thing gc removes: an unreferenced artifact, a staging dir, an abandoned run's
    checkpoints, a published model's checkpoints and an artifact directory without a manifest."""
    base = Path(store.base)
    publish(store, "0rphan00", rows=50)
    kept = publish(store, "kept0000")
    store.set_ref("run/kept", kept.ref)
    staging = base / "tmp/5e7a0000-deadbeef"
    (staging / "data").mkdir(parents=True)
    (staging / "data/part-00000.parquet").write_bytes(b"x" * 300)
    abandoned = base / "checkpoints/abandon0/step-0000002"
    abandoned.mkdir(parents=True)
    (abandoned / "checkpoint.pt").write_bytes(b"y" * 700)
    superseded = base / "checkpoints/kept0000/step-0000004"
    superseded.mkdir(parents=True)
    (superseded / "checkpoint.pt").write_bytes(b"z" * 900)
    incomplete = base / "artifacts/samples/1ncompl0/data"
    incomplete.mkdir(parents=True)
    (incomplete / "part-00000.parquet").write_bytes(b"w" * 100)
    return {"artifacts/samples/0rphan00": base / "artifacts/samples/0rphan00",
            "tmp/5e7a0000-deadbeef": staging, "checkpoints/abandon0": abandoned.parent,
            "checkpoints/kept0000": superseded.parent, "artifacts/samples/1ncompl0": incomplete.parent}


def test_dry_run_lists_everything_with_sizes_and_removes_nothing(store):
    planted = plant_leftovers(store)
    before = tree_digest(Path(store.base))
    listed = store.gc(dry_run=True, grace_s=0)
    assert tree_digest(Path(store.base)) == before
    assert {r.path: r.bytes for r in listed} == {path: disk_bytes(where) for path, where in planted.items()}
    assert {r.path: r.category for r in listed} == {
        "artifacts/samples/0rphan00": "artifact", "tmp/5e7a0000-deadbeef": "staging",
        "checkpoints/abandon0": "checkpoints", "checkpoints/kept0000": "checkpoints",
        "artifacts/samples/1ncompl0": "incomplete"}
    assert "bytes" in str(listed[0])

    removed = store.gc(grace_s=0)
    assert sorted(r.path for r in removed) == sorted(planted)
    assert not any(where.exists() for where in planted.values())
    assert store.list() == [ArtifactRef("samples", "kept0000")]
    assert list((Path(store.base) / "tmp").iterdir()) == []  # gc's own renamed-out copies are gone too


def test_checkpoints_of_a_published_model_go_at_once_abandoned_ones_after_the_grace(store):
    plant_leftovers(store)
    young = {r.path for r in store.gc()}
    assert young == {"checkpoints/kept0000"}  # superseded by its published model, whatever its age
    assert (Path(store.base) / "checkpoints/abandon0").exists()  # could be a live run's: within the grace
    assert "checkpoints/abandon0" in {r.path for r in store.gc(grace_s=0)}


def test_a_live_training_run_keeps_its_checkpoints_however_old(store):
    directory = Path(store.base) / "checkpoints/running0"
    lock = hold_writer_lock(str(directory))
    (directory / "step-0000002").mkdir()
    (directory / "step-0000002/checkpoint.pt").write_bytes(b"state")
    assert store.gc(grace_s=0) == []
    del lock
    python_gc.collect()
    assert [r.path for r in store.gc(grace_s=0)] == ["checkpoints/running0"]


def test_the_store_checkpointer_holds_the_writer_lock(store):
    import torch

    from prefloop.tasks.training.artifacts import StoreCheckpointer
    from prefloop.tasks.training.optim import Checkpoint

    checkpoints = StoreCheckpointer(store, "running0", "train", "3")
    checkpoints.save(Checkpoint(step=2, num_steps=4, model={"w": torch.zeros(2)}, optimizer={}, scheduler={},
                                history=[]))
    assert store.gc(grace_s=0) == []
    del checkpoints
    python_gc.collect()
    assert [r.path for r in store.gc(grace_s=0)] == ["checkpoints/running0"]


def test_a_looked_up_artifact_is_young_again(store, monkeypatch):
    publish(store, "0ld00000")
    publish(store, "0ld11111")
    later = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: later)
    store.touch(ArtifactRef("samples", "0ld11111"))  # a run just found it and is about to set its ref
    assert [r.path for r in store.gc(grace_s=3600)] == ["artifacts/samples/0ld00000"]


def test_a_damaged_ref_stops_gc_before_it_removes_anything(store):
    publish(store, "0rphan00")
    child = publish(store, "ch1ld000")
    store.set_ref("run/child", child.ref)
    (Path(store.base) / "refs/run/child.json").write_text("{truncated")
    with pytest.raises(StoreError, match="ref 'run/child' is damaged.*delete it"):
        store.gc(grace_s=0)
    assert len(store.list()) == 2
