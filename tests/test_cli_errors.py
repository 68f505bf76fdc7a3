"""The CLI's error policy (one line for a user error, 'internal error' plus a traceback file for a bug),
``export`` refusing to overwrite, and ``worker`` stopping the process it started on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.datasets_spec import PREFERENCES
from prefloop.storage import ArtifactRef, ArtifactStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def test_a_bug_is_an_internal_error_with_its_traceback_in_a_file(tmp_path, monkeypatch):
    # A bare KeyError from project code is a bug, not a user error: it must not shrink to 'error: prompt'.
    def broken(self, prefix=""):
        raise KeyError("prompt")

    monkeypatch.setattr(ArtifactStore, "refs", broken)
    result = cli("ls", "--store", tmp_path / "store")
    assert result.exit_code == 1
    assert "internal error: KeyError: 'prompt'" in result.output
    log = Path(result.output.split("the full traceback is in ")[1].split(";")[0].strip())
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text() and "def broken" not in result.output


def test_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    unknown = cli("show", "no/such", "--store", tmp_path / "store")
    assert unknown.exit_code == 2 and unknown.output.startswith("error: ") and "prefloop ls" in unknown.output
    assert "Traceback" not in unknown.output

    def full(self, dry_run=False, grace_s=0.0):
        raise StoreError("cannot remove tmp/x: the store is read-only; run gc as the store's owner")

    monkeypatch.setattr(ArtifactStore, "gc", full)
    gc = cli("gc", "--store", store.root)
    assert gc.exit_code == 2 and gc.output.strip() == (
        "error: cannot remove tmp/x: the store is read-only; run gc as the store's owner")


def test_ls_lists_a_dangling_ref_instead_of_failing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = _preferences(store)
    store.set_ref("mine/pairs", ref)
    manifest = store._artifact_dir(ref) + "/manifest.json"
    Path(manifest).unlink()
    listing = cli("ls", "--store", tmp_path / "store")
    assert listing.exit_code == 0, listing.output
    assert "missing" in listing.output and "mine/pairs" in listing.output and "Traceback" not in listing.output


def test_gc_dry_run_lists_what_it_would_remove_with_sizes_and_removes_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = _preferences(store)  # no ref points at it
    size = sum(p.stat().st_size for p in (tmp_path / "store" / "artifacts").rglob("*") if p.is_file())
    kept = cli("gc", "--dry-run", "--store", store.uri)  # younger than the grace period: kept
    assert kept.exit_code == 0 and "would remove 0 item(s)" in kept.output
    listed = cli("gc", "--dry-run", "--grace", "0", "--store", store.uri)
    assert listed.exit_code == 0, listed.output
    assert ref.id in listed.output and "would remove 1 item(s)" in listed.output
    assert f"{size} B" in listed.output or f"{size / 1024:.1f} KiB" in listed.output
    assert store.exists(ref)
    removed = cli("gc", "--grace", "0", "--store", store.uri)
    assert removed.exit_code == 0 and "removed 1 item(s)" in removed.output and not store.exists(ref)


def _preferences(store: ArtifactStore) -> ArtifactRef:
    row = {f.name: None for f in PREFERENCES.schema}
    row |= {"pair_id": "p1", "prompt_id": "q", "prompt": "q?", "chosen": "A:1", "rejected": "A:2"}
    table = pa.Table.from_pylist([row], schema=PREFERENCES.schema)
    with store.writer("preferences", "hand") as writer:
        writer.write_table(table, schema_id=PREFERENCES.schema_id, schema_version=PREFERENCES.version)
        writer.commit(stage="hand", stage_version="1")
    return ArtifactRef("preferences", "hand")


def test_export_never_overwrites_without_force(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    _preferences(store)
    out = tmp_path / "out"
    assert cli("export", "preferences/hand", "--out", out, "--store", store.root).exit_code == 0
    first = (out / "train.parquet").read_bytes()
    (out / "train.parquet").write_bytes(b"edited by hand")
    again = cli("export", "preferences/hand", "--out", out, "--store", store.root)
    assert again.exit_code == 2 and "--force" in again.output
    assert (out / "train.parquet").read_bytes() == b"edited by hand"  # nothing overwritten
    forced = cli("export", "preferences/hand", "--out", out, "--force", "--store", store.root)
    assert forced.exit_code == 0 and (out / "train.parquet").read_bytes() == first
    assert json.loads((out / "prefloop-export.json").read_text())["artifact"] == "preferences/hand"
    # A folder that is not an earlier export is never replaced, even with --force.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = cli("export", "preferences/hand", "--out", other, "--force", "--store", store.root)
    assert refused.exit_code == 2 and (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# The worker 'prefloop worker' starts is replaced by a process that starts a grandchild (as Prefect's
# server does) and records both pids; the CLI is then stopped by pid, as a process supervisor does.
FAKE_WORKER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    import prefloop.flows.deploy as deploy
    pids = Path(sys.argv[1])
    child = ("import os, subprocess, sys, time; from pathlib import Path; "
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             "Path(sys.argv[1]).write_text(f'{os.getpid()} {g.pid}'); time.sleep(120)")
    deploy.prefect_command = lambda *args: [sys.executable, "-c", child, str(pids)]
    sys.argv = ["prefloop", "worker", "--pool", "cpu", "--api", "http://127.0.0.1:9/api"]
    from prefloop.cli import app
    app()
""")


def test_sigterm_to_worker_stops_what_it_started(tmp_path):
    pids_file = tmp_path / "pids"
    cli_process = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(pids_file)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pids_file.exists() and len(pids_file.read_text().split()) == 2):
            assert cli_process.poll() is None, cli_process.stdout.read().decode()
            assert time.monotonic() < deadline, "the fake worker never started"
            time.sleep(0.1)
        started = [int(pid) for pid in pids_file.read_text().split()]
        assert all(_alive(pid) for pid in started)
        os.kill(cli_process.pid, signal.SIGTERM)
        output = cli_process.communicate(timeout=30)[0].decode()
        assert cli_process.returncode == 0, output
        assert not [pid for pid in started if _alive(pid)], f"left running: {started}"
    finally:
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if cli_process.poll() is None:
            os.killpg(cli_process.pid, signal.SIGKILL)
            cli_process.wait()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_messages_keep_their_brackets(tmp_path, monkeypatch):
    # Rich markup must not eat a message's brackets (labels come from several labelers ['a', 'b']).
    def refuse(self, prefix=""):
        raise StoreError("labelers ['a', 'b'] and [bold]x[/bold] differ")

    monkeypatch.setattr(ArtifactStore, "refs", refuse)
    result = cli("ls", "--store", tmp_path / "store")
    assert result.exit_code == 2 and result.output.strip() == "error: labelers ['a', 'b'] and [bold]x[/bold] differ"
