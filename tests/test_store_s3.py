"""The store on S3 for real: s3fs against a local S3 server (moto's server mode, tests/s3_server.py).

The smoke loop end to end on ``s3://`` and every store-taking CLI command on its output; two writers of
one id leave one valid artifact (with the server's conditional writes, and without them); a reader
never sees a half-written artifact; a corrupted object is refused on read; gc on a bucket (grace
period, orphaned writer folders, leases as writer locks, the ``.used`` marker); no credential or
endpoint is ever written into the bucket.
"""

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from s3_server import FAKE_KEY_ID, FAKE_SECRET, s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
from typer.testing import CliRunner

from prefloop.errors import UserError
from prefloop.storage import ArtifactNotFoundError, ArtifactRef, ArtifactStore, TamperedArtifactError
from prefloop.storage import writer as writer_module
from prefloop.storage.gc import WRITER_LOCK, hold_writer_lock

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def publish(store: ArtifactStore, artifact_id: str, table: pa.Table | None = None, **fields):
    with store.writer("samples", artifact_id) as writer:
        writer.write_table(table if table is not None else pa.table({"x": [1, 2, 3]}))
        writer.add_file("weights.bin", b"\x00\x01\x02")
        return writer.commit(stage="test", stage_version="1", **fields)


def keys(server, root: str) -> list[str]:
    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# -- the smoke loop and the CLI on s3:// ------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_s3(s3_server):  # noqa: F811
    from prefloop.config import load_loop_config
    from prefloop.flows.loop import run_loop

    s3_server.client().create_bucket(Bucket="prefloop-smoke")
    root = "s3://prefloop-smoke/team/store"
    started = time.perf_counter()
    summary = run_loop(load_loop_config(ROOT / "configs/smoke.yaml"), root)
    return root, summary, time.perf_counter() - started


def test_smoke_loop_runs_on_s3_and_reruns_from_the_bucket(smoke_s3, s3_server):  # noqa: F811
    from prefloop.config import load_loop_config
    from prefloop.flows.loop import run_loop

    root, summary, _ = smoke_s3
    store = ArtifactStore(root)
    refs = store.refs("smoke/")
    for round_index in (1, 2):
        for stage in ("samples", "labels", "preferences", "preferences-filtered", "policy", "metrics"):
            assert f"smoke/round-{round_index}/{stage}" in refs
    assert store.read_manifest(refs["smoke/round-2/samples"]).inputs["policy"] == str(refs["smoke/round-1/policy"])
    # Every artifact is in the bucket, in its writer's folder, and checks out against its manifest.
    assert len(store.list()) >= 15
    for ref in store.list():
        manifest = store.verify(ref)
        assert manifest.files_prefix.startswith("w-")
        assert any(key.startswith(f"team/store/artifacts/{ref}/{manifest.files_prefix}/") for key in keys(s3_server, root))
    again = run_loop(load_loop_config(ROOT / "configs/smoke.yaml"), root)
    assert all(stage.cached for r in again.rounds for stage in r.stages)
    assert [r.metrics for r in again.rounds] == [r.metrics for r in summary.rounds]


def test_no_credential_or_endpoint_is_written_into_the_bucket(smoke_s3, s3_server):  # noqa: F811
    root, _, _ = smoke_s3
    bucket = root.removeprefix("s3://").split("/", 1)[0]
    client = s3_server.client()
    secrets = [FAKE_KEY_ID.encode(), FAKE_SECRET.encode(), s3_server.endpoint.removeprefix("http://").encode(),
               b"AWS_SECRET", b"aws_access_key"]
    found = keys(s3_server, root)
    assert any(k.endswith("manifest.json") for k in found) and any("/refs/" in k for k in found)
    for key in found:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not [s for s in secrets if s in body], key


def test_a_store_uri_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(UserError, match="AWS_ACCESS_KEY_ID") as refused:
        ArtifactStore("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/store")
    assert "wJalrXUtnFEMI" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)


def cli(*args):
    from prefloop.cli import app

    return runner.invoke(app, [*map(str, args)])


def test_cli_commands_on_s3(smoke_s3, tmp_path, monkeypatch):
    root, _, _ = smoke_s3
    listed = cli("ls", "smoke/", "--store", root)
    assert listed.exit_code == 0, listed.output
    assert "smoke/round-2/metrics" in listed.output and "missing" not in listed.output
    monkeypatch.setenv("PREFLOOP_STORE", root)  # the environment variable works as --store does
    assert "smoke/round-1/preferences" in cli("ls").output
    shown = cli("show", "smoke/round-1/preferences-filtered", "--rows", "1")
    assert shown.exit_code == 0 and "row 0" in shown.output, shown.output
    assert cli("show", "smoke/round-0/policy", "--json").exit_code == 0
    tree = cli("lineage", "smoke/round-1/metrics")
    assert tree.exit_code == 0 and "policy" in tree.output, tree.output
    checked = cli("validate", "smoke/round-1/preferences")
    assert checked.exit_code == 0 and "checksums: ok" in checked.output, checked.output
    exported = cli("export", "smoke/round-1/preferences-filtered", "--out", tmp_path / "trl")
    assert exported.exit_code == 0, exported.output
    assert list((tmp_path / "trl").glob("*.parquet"))
    stage = cli("stage", "prompts", "--config", ROOT / "configs/smoke.yaml", "--name", "again/prompts")
    assert stage.exit_code == 0 and "cached" in stage.output, stage.output
    rerun = cli("run", "--config", ROOT / "configs/smoke.yaml", "--no-prefect")
    assert rerun.exit_code == 0 and "accuracy" in rerun.output, rerun.output
    report = cli("report", "smoke", "--out", tmp_path / "report")
    assert report.exit_code == 0 and (tmp_path / "report").is_dir(), report.output
    compared = cli("compare", "smoke", "smoke")
    assert compared.exit_code == 0, compared.output
    assert cli("code", "show", "prompts").exit_code == 0
    dry = cli("gc", "--dry-run", "--grace", "0")
    assert dry.exit_code == 0 and "would remove 0 item(s)" in dry.output, dry.output


# -- publish: one valid artifact per id, nothing half-written visible -------------------------------
def test_the_server_honours_conditional_writes(s3_bucket):  # noqa: F811
    """What the publish protocol relies on: a PUT with If-None-Match: * (s3fs mode="create") of an
    existing key fails with 412, which s3fs raises as FileExistsError, and the first object stays."""
    fs = ArtifactStore(s3_bucket).fs
    fs.pipe_file(f"{s3_bucket}/probe", b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{s3_bucket}/probe", b"second", mode="create")
    assert fs.cat_file(f"{s3_bucket}/probe") == b"first"


def race(root: str, artifact_id: str, writers: int) -> list:
    """``writers`` threads write different tables to one id and commit at the same moment."""
    barrier = threading.Barrier(writers)
    results: list = [None] * writers

    def write(index: int) -> None:
        store = ArtifactStore(root)
        with store.writer("samples", artifact_id) as writer:
            writer.write_table(pa.table({"x": list(range(index * 10, index * 10 + 5))}))
            writer.add_file("weights.bin", bytes([index]) * 1000)
            barrier.wait(timeout=30)
            results[index] = writer.commit(stage="test", stage_version="1", metrics={"writer": index})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results)
    return results


def assert_one_valid_artifact(store: ArtifactStore, artifact_id: str) -> int:
    ref = ArtifactRef("samples", artifact_id)
    manifest = store.verify(ref)
    winner = manifest.metrics["writer"]
    assert store.read_table(ref).column("x").to_pylist() == list(range(winner * 10, winner * 10 + 5))
    assert store.read_file(ref, "weights.bin") == bytes([winner]) * 1000
    return winner


def test_concurrent_writers_of_one_id_leave_one_valid_artifact(s3_bucket, s3_server):  # noqa: F811
    """Even when the writers' bytes differ (a non-deterministic stage), every writer gets the winner's
    manifest back, the artifact verifies, and the losers' folders are gone."""
    results = race(s3_bucket, "c0ffee00", writers=4)
    store = ArtifactStore(s3_bucket)
    winner = assert_one_valid_artifact(store, "c0ffee00")
    assert {r.metrics["writer"] for r in results} == {winner}
    folders = {k.split("/")[4] for k in keys(s3_server, s3_bucket) if k.split("/")[4].startswith("w-")}
    assert folders == {results[0].files_prefix}


def test_without_conditional_writes_the_last_manifest_wins_and_is_still_valid(s3_bucket, s3_server, monkeypatch):  # noqa: F811
    """A server that ignores If-None-Match: both manifest PUTs land, the last stays. It lists only its own
    writer's complete folder, so the artifact verifies; gc removes the other folder as an orphan."""
    fs = ArtifactStore(s3_bucket).fs
    plain = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda path, value, mode="overwrite", **kw: plain(path, value, **kw))
    race(s3_bucket, "c0ffee01", writers=3)
    monkeypatch.undo()
    store = ArtifactStore(s3_bucket)
    winner = assert_one_valid_artifact(store, "c0ffee01")
    store.set_ref("kept", ArtifactRef("samples", "c0ffee01"))
    removed = store.gc(grace_s=0)
    assert sorted(r.category for r in removed) == ["orphan", "orphan"]
    assert assert_one_valid_artifact(store, "c0ffee01") == winner


def test_gc_keeps_an_orphan_whose_manifest_lands_after_the_scan(s3_bucket, monkeypatch):  # noqa: F811
    """Without conditional writes a late writer's manifest can replace the one gc scanned: gc reads the
    manifest again before removing a writer folder, so the folder the artifact now lists stays."""
    fs = ArtifactStore(s3_bucket).fs
    plain = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda path, value, mode="overwrite", **kw: plain(path, value, **kw))
    results = race(s3_bucket, "c0ffee02", writers=2)
    monkeypatch.undo()
    store = ArtifactStore(s3_bucket)
    ref = ArtifactRef("samples", "c0ffee02")
    store.set_ref("kept", ref)
    current = store.read_manifest(ref).files_prefix
    late = next(r for r in results if r.files_prefix != current)  # the folder gc sees as an orphan
    reachable, calls = store.reachable, []

    def then_the_late_manifest_lands():
        calls.append(1)
        if len(calls) == 2:  # gc's second look, between its scan and its removals
            body = json.dumps(late.model_dump(mode="json"), sort_keys=True).encode()
            fs.pipe_file(f"{s3_bucket}/artifacts/samples/c0ffee02/manifest.json", body)
        return reachable()

    monkeypatch.setattr(store, "reachable", then_the_late_manifest_lands)
    assert store.gc(grace_s=0) == []
    assert assert_one_valid_artifact(store, "c0ffee02") == late.metrics["writer"]


def test_a_reader_never_sees_a_half_written_artifact(s3_bucket, monkeypatch):  # noqa: F811
    monkeypatch.setattr(writer_module, "ROWS_PER_PART", 10)  # many parts: a long window to look into
    table = pa.table({"x": list(range(200))})
    writer_store, reader = ArtifactStore(s3_bucket), ArtifactStore(s3_bucket)
    ref = ArtifactRef("samples", "5eed0000")
    seen, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.append(reader.read_table(ref).column("x").to_pylist() == table.column("x").to_pylist())
            except ArtifactNotFoundError:
                seen.append(None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with writer_store.writer("samples", ref.id) as writer:
            writer.write_table(table)
            assert not reader.exists(ref) and reader.list() == []
            with pytest.raises(ArtifactNotFoundError):
                reader.resolve(str(ref))
            writer.commit(stage="test", stage_version="1")
        deadline = time.monotonic() + 30  # until the watcher has read the published artifact once
        while True not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        watcher.join()
    assert None in seen and True in seen and False not in seen  # absent, then whole: never partial
    # A write that fails midway publishes nothing and removes its folder.
    with pytest.raises(RuntimeError), writer_store.writer("samples", "5eed0001") as writer:
        writer.write_table(table)
        raise RuntimeError("killed")
    assert not reader.exists(ArtifactRef("samples", "5eed0001"))
    assert not reader.fs.exists(f"{s3_bucket}/artifacts/samples/5eed0001")


def test_a_corrupted_object_is_refused_on_read_with_the_fix(s3_bucket, s3_server):  # noqa: F811
    store = ArtifactStore(s3_bucket)
    manifest = publish(store, "bad00000")
    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    part = f"{prefix}/artifacts/samples/bad00000/{manifest.files_prefix}/data/part-00000.parquet"
    client = s3_server.client()
    original = client.get_object(Bucket=bucket, Key=part)["Body"].read()
    client.put_object(Bucket=bucket, Key=part, Body=original[:-8] + b"\x00" * 8)
    with pytest.raises(TamperedArtifactError, match=r"samples/bad00000 is damaged: 'data/part-00000.parquet' "
                       r"has sha256 .* Delete the artifact"):
        store.read_table(manifest.ref)
    checked = cli("validate", "samples/bad00000", "--store", s3_bucket)
    assert checked.exit_code != 0 and "is damaged" in checked.output, checked.output
    client.delete_object(Bucket=bucket, Key=part)
    with pytest.raises(TamperedArtifactError, match="is missing"):
        store.read_table(manifest.ref)
    # The weights are checked too, and local_files hands out nothing unverified.
    weights = f"{prefix}/artifacts/samples/bad00000/{manifest.files_prefix}/files/weights.bin"
    client.put_object(Bucket=bucket, Key=weights, Body=b"\x09\x09\x09")
    with pytest.raises(TamperedArtifactError, match="weights.bin"):
        store.read_file(manifest.ref, "weights.bin")


def test_an_artifact_gc_removes_while_it_is_read_is_reported_as_removed_not_damaged(s3_bucket, monkeypatch):  # noqa: F811
    store = ArtifactStore(s3_bucket)
    manifest = publish(store, "9c9c0000")
    monkeypatch.setattr(store, "read_manifest", lambda ref, area="artifacts": manifest)  # read before gc ran
    assert [r.path for r in ArtifactStore(s3_bucket).gc(grace_s=0)] == ["artifacts/samples/9c9c0000"]
    with pytest.raises(ArtifactNotFoundError, match="was removed .* while it was being read"):
        store.read_table(manifest.ref)


def test_what_another_process_publishes_or_removes_is_seen_at_once(s3_bucket, s3_server):  # noqa: F811
    """No cached listing: an artifact another process publishes into the bucket, or whose manifest its gc
    deletes, is listed or gone for this store at once."""
    store = ArtifactStore(s3_bucket)
    ref = publish(store, "11110000").ref
    assert store.list() == [ref] and store.exists(ref)
    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    client = s3_server.client()
    manifest = store.fs.cat_file(f"{s3_bucket}/artifacts/samples/11110000/manifest.json")
    client.put_object(Bucket=bucket, Key=f"{prefix}/artifacts/samples/22220000/manifest.json",
                      Body=manifest.replace(b'"11110000"', b'"22220000"'))
    other = ArtifactRef("samples", "22220000")
    assert store.list() == [ref, other] and store.read_manifest(other).id == "22220000"
    client.delete_object(Bucket=bucket, Key=f"{prefix}/artifacts/samples/11110000/manifest.json")
    assert not store.exists(ref) and store.list() == [other]


# -- gc on a bucket -------------------------------------------------------------------------------
def test_gc_on_s3_removes_what_it_may_and_keeps_the_rest(s3_bucket, s3_server):  # noqa: F811
    store = ArtifactStore(s3_bucket)
    kept = publish(store, "aaaa0000").ref
    store.set_ref("run/kept", kept)
    unreferenced = publish(store, "bbbb0000").ref
    fs = store.fs
    # A writer killed before its manifest; a checkpoint run that is abandoned.
    fs.pipe_file(f"{s3_bucket}/artifacts/samples/cccc0000/w-0123456789abcdef/data/part-00000.parquet", b"x" * 50)
    fs.pipe_file(f"{s3_bucket}/checkpoints/deadrun0/step-0000001/checkpoint.pt", b"y" * 70)
    assert store.gc(dry_run=True) == []  # everything is younger than the default grace period
    removed = {r.path: r.category for r in store.gc(dry_run=True, grace_s=0)}
    assert removed == {"artifacts/samples/bbbb0000": "artifact", "artifacts/samples/cccc0000": "incomplete",
                       "checkpoints/deadrun0": "checkpoints"}
    assert store.exists(unreferenced)  # a dry run removes nothing
    ran = cli("gc", "--grace", "0", "--store", s3_bucket)
    assert ran.exit_code == 0 and "removed 3 item(s)" in ran.output, ran.output
    remaining = keys(s3_server, s3_bucket)
    assert not [k for k in remaining if "bbbb0000" in k or "cccc0000" in k or "deadrun0" in k]
    assert store.verify(kept) and store.list() == [kept]


def test_gc_never_deletes_the_files_of_a_writer_that_starts_on_the_id_it_removes(s3_bucket, monkeypatch):  # noqa: F811
    """gc deletes the manifest, then exactly the objects it listed before: a stage that finds the id gone
    and writes it again (into a new folder) right then keeps every file its manifest will list."""
    store = ArtifactStore(s3_bucket)
    old = publish(store, "ffff0000", pa.table({"x": [1]})).ref
    fs = store.fs
    remove_manifest = fs.rm_file
    rewrite = {}

    def then_a_writer_starts(path, *args, **kwargs):
        remove_manifest(path, *args, **kwargs)
        if path.endswith("ffff0000/manifest.json") and not rewrite:
            rewrite["manifest"] = publish(ArtifactStore(s3_bucket), "ffff0000", pa.table({"x": [2]}))

    monkeypatch.setattr(fs, "rm_file", then_a_writer_starts)
    assert [r.path for r in store.gc(grace_s=0)] == [f"artifacts/{old}"]
    monkeypatch.undo()
    assert store.verify(old).files_prefix == rewrite["manifest"].files_prefix
    assert store.read_table(old).column("x").to_pylist() == [2]


def test_gc_on_s3_spares_an_artifact_just_looked_up(s3_bucket):  # noqa: F811
    """ArtifactStore.touch rewrites a marker object, which dates the artifact for gc's grace period."""
    store = ArtifactStore(s3_bucket)
    looked_up, untouched = publish(store, "dddd0000").ref, publish(store, "eeee0000").ref
    time.sleep(2.2)  # S3 times have one-second resolution
    store.touch(looked_up)
    removed = [r.path for r in store.gc(grace_s=2.0)]
    assert removed == [f"artifacts/{untouched}"]
    assert store.exists(looked_up)


def test_a_lease_is_the_writer_lock_on_s3(s3_bucket):  # noqa: F811
    """A live run's lease keeps its checkpoints from gc whatever their age; released, or lapsed because
    its holder died and stopped renewing, it does not."""
    store = ArtifactStore(s3_bucket)
    live, dead = f"{store.base}/checkpoints/liverun0", f"{store.base}/checkpoints/deadrun1"
    for directory in (live, dead):
        store.fs.pipe_file(f"{directory}/step-0000003/checkpoint.pt", b"z" * 10)
    lease = hold_writer_lock(live, store.fs, lease_s=3.0)  # renewed every second
    assert lease is not None and hold_writer_lock(live, store.fs, lease_s=3.0) is None  # held: it protects both
    store.fs.pipe_file(f"{dead}/{WRITER_LOCK}", b'{"owner": "gone", "lease_s": 1.0}')  # its holder was killed
    time.sleep(1.3)  # past the dead one's lease
    assert [r.path for r in store.gc(grace_s=0)] == ["checkpoints/deadrun1"]
    assert store.fs.exists(f"{live}/step-0000003/checkpoint.pt")
    del lease  # released: the lock object goes, and the run's checkpoints are fair game
    import gc as python_gc

    python_gc.collect()
    assert not store.fs.exists(f"{live}/{WRITER_LOCK}")
    assert [r.path for r in store.gc(grace_s=0)] == ["checkpoints/liverun0"]


def test_checkpoints_save_and_resume_on_s3(s3_bucket):  # noqa: F811
    import torch

    from prefloop.tasks.training.artifacts import StoreCheckpointer
    from prefloop.tasks.training.optim import Checkpoint

    store = ArtifactStore(s3_bucket)
    checkpoints = StoreCheckpointer(store, "run00001", "train", "3")
    for step in (2, 4):
        checkpoints.save(Checkpoint(step=step, num_steps=10, model={"w": torch.full((3,), float(step))},
                                    optimizer={}, scheduler={}, history=[]))
    assert checkpoints.steps() == [4]
    assert checkpoints.load().model["w"].tolist() == [4.0, 4.0, 4.0]


def test_import_and_data_commands_on_s3(s3_bucket, tmp_path):  # noqa: F811
    """The bring-your-own-data path on a bucket: import prompts and completions, then the data-only flow."""
    from test_data_flow import PROMPT_MAP, SAMPLE_MAP, completions_file

    source = completions_file(tmp_path)
    for kind, mapping in (("prompts", PROMPT_MAP), ("samples", SAMPLE_MAP)):
        options = [part for target, path in mapping.items() for part in ("--map", f"{target}={path}")]
        imported = cli("import", kind, source, *options, "--name", f"mine/{kind}", "--store", s3_bucket)
        assert imported.exit_code == 0 and "imported" in imported.output, imported.output
    flowed = cli("data", "--config", ROOT / "configs/data_only.yaml", "--prompts", "mine/prompts", "--samples",
                 "mine/samples", "--name", "mine", "--out", tmp_path / "trl", "--no-prefect", "--store", s3_bucket)
    assert flowed.exit_code == 0 and "exported to" in flowed.output, flowed.output
    store = ArtifactStore(s3_bucket)
    assert store.read_manifest(store.resolve("mine/preferences-filtered")).rows > 0
    assert list((tmp_path / "trl").rglob("*.parquet"))
