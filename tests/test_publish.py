"""Publish tells the truth: only a lost race (the id already holds a valid manifest) counts as success;
every other failure raises a PublishError saying what, where and how to fix, and leaves no staging
directory. Training checkpoints go through the same writer."""

import errno
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from prefloop.storage import ArtifactRef, ArtifactStore, PublishError
from prefloop.storage.layout import CHECKPOINTS


def staging_dirs(store: ArtifactStore) -> list[Path]:
    tmp = Path(store.base) / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def publish(store: ArtifactStore, artifact_id: str = "a1b2c3d4", rows: int = 3):
    with store.writer("samples", artifact_id) as writer:
        writer.write_table(pa.table({"x": list(range(rows))}))
        return writer.commit(stage="test", stage_version="1")


def failing_rename(code: int):
    def rename(source, target):
        raise OSError(code, os.strerror(code), target)

    return rename


@pytest.mark.parametrize(("code", "advice"), [(errno.EACCES, "permissions"), (errno.ENOSPC, "full"),
                                               (errno.EROFS, "read-only"), (errno.EIO, "filesystem")])
def test_a_failed_rename_raises_and_leaves_nothing(store, monkeypatch, code, advice):
    monkeypatch.setattr(os, "rename", failing_rename(code))
    with pytest.raises(PublishError) as raised:
        publish(store)
    message = str(raised.value)
    assert "samples/a1b2c3d4" in message and "artifacts/samples/a1b2c3d4" in message
    assert errno.errorcode[code] in message and advice in message and "Nothing was published" in message
    assert not store.exists(ArtifactRef("samples", "a1b2c3d4"))
    assert staging_dirs(store) == []


def test_a_full_disk_while_writing_data_raises_and_leaves_nothing(store, monkeypatch):
    real_open = store.fs.open

    def open_(path, mode="rb", **kwargs):
        if "part-" in path and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(store.fs, "open", open_)
    with pytest.raises(PublishError, match=r"writing 'data/part-00000.parquet'.*ENOSPC.*full"):
        publish(store)
    assert staging_dirs(store) == [] and store.list() == []


def test_a_lost_race_returns_the_published_manifest(store):
    with store.writer("samples", "a1b2c3d4") as slow:
        slow.write_table(pa.table({"x": [0, 1, 2]}))
        winner = publish(store)  # another writer of the same id publishes first
        returned = slow.commit(stage="test", stage_version="1", metrics={"writer": "slow"})
    assert returned == winner and slow.committed == winner
    assert store.read_manifest(winner.ref) == winner
    assert staging_dirs(store) == []


def test_a_target_without_a_valid_manifest_is_not_a_lost_race(store):
    target = Path(store.base) / "artifacts/samples/a1b2c3d4"
    with pytest.raises(PublishError, match="holds no valid manifest.*Delete that directory"):
        with store.writer("samples", "a1b2c3d4") as writer:
            writer.write_table(pa.table({"x": [1]}))
            target.mkdir(parents=True)
            (target / "leftover.bin").write_bytes(b"half of something")
            writer.commit(stage="test", stage_version="1")
    assert (target / "leftover.bin").read_bytes() == b"half of something"  # not ours to delete
    assert staging_dirs(store) == []


def test_an_object_store_never_overwrites_a_published_manifest():
    store = ArtifactStore(f"memory://prefloop-publish-{uuid.uuid4().hex[:6]}")
    with store.writer("samples", "a1b2c3d4") as slow:
        slow.write_table(pa.table({"x": [0, 1, 2]}))
        winner = publish(store)
        manifest_path = f"{store.base}/artifacts/samples/a1b2c3d4/manifest.json"
        before = store.fs.cat_file(manifest_path)
        assert slow.commit(stage="test", stage_version="1", metrics={"writer": "slow"}) == winner
    assert store.fs.cat_file(manifest_path) == before


def checkpoint(step: int):
    import torch

    from prefloop.tasks.training.optim import Checkpoint

    return Checkpoint(step=step, num_steps=10, model={"w": torch.full((3,), float(step))}, optimizer={},
                      scheduler={}, history=[{"loss": 1.0 / step}])


def test_checkpoints_are_published_by_the_store_writer(store):
    from prefloop.tasks.training.artifacts import StoreCheckpointer

    checkpoints = StoreCheckpointer(store, "run0001", "train", "3")
    checkpoints.save(checkpoint(2))
    manifest = store.read_manifest(ArtifactRef("run0001", "step-0000002"), CHECKPOINTS)
    assert manifest.metrics == {"step": 2, "num_steps": 10} and [f.path for f in manifest.files] == ["checkpoint.pt"]
    assert checkpoints.load().model["w"].tolist() == [2.0, 2.0, 2.0]
    assert staging_dirs(store) == []


def test_a_failed_checkpoint_write_raises_and_keeps_the_previous_one(store, monkeypatch):
    from prefloop.tasks.training.artifacts import StoreCheckpointer

    checkpoints = StoreCheckpointer(store, "run0001", "train", "3")
    checkpoints.save(checkpoint(2))
    monkeypatch.setattr(os, "rename", failing_rename(errno.ENOSPC))
    with pytest.raises(PublishError, match=r"checkpoints/run0001/step-0000004.*ENOSPC.*full"):
        checkpoints.save(checkpoint(4))
    monkeypatch.undo()
    assert checkpoints.steps() == [2] and staging_dirs(store) == []


def test_a_damaged_checkpoint_manifest_is_refused(store):
    from prefloop.tasks.training.artifacts import CheckpointDamagedError, StoreCheckpointer

    checkpoints = StoreCheckpointer(store, "run0001", "train", "3")
    checkpoints.save(checkpoint(2))
    path = Path(store.base) / "checkpoints/run0001/step-0000002/manifest.json"
    doc = json.loads(path.read_text())
    doc["files"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointDamagedError, match="checkpoint .* is damaged.*delete"):
        checkpoints.load()
    path.write_text("{not json")
    with pytest.raises(CheckpointDamagedError, match="not a valid manifest"):
        checkpoints.load()
