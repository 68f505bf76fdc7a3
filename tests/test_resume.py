"""A loop killed with SIGKILL at any point resumes: the rerun recomputes only what was unfinished
and ends with the same artifacts as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import artifact_checksums

from prefloop.config import load_loop_config
from prefloop.flows.loop import run_loop
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/smoke.yaml"
RUN = f"""
import sys
from prefloop.config import load_loop_config
from prefloop.flows.loop import run_loop
run_loop(load_loop_config({str(CONFIG)!r}, rounds=1), sys.argv[1])
"""

# The same run, made to stop in the middle of a stage at a chosen point: once ``kill_after``
# artifacts are published, the next commit writes a marker and waits (its files are staged, its
# manifest is not written) until the test kills the process. A kill point chosen by the clock
# raced the run on a fast machine; this one is the same everywhere.
RUN_UNTIL = f"""
import os, sys, time
from prefloop.storage.writer import ArtifactWriter
path, kill_after, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
commit = ArtifactWriter.commit

def commit_or_wait(self, **fields):
    if len(self.store.list()) >= kill_after:
        with open(marker, "w") as handle:
            handle.write(self.label)
        while True:
            time.sleep(60)
    return commit(self, **fields)

ArtifactWriter.commit = commit_or_wait
from prefloop.config import load_loop_config
from prefloop.flows.loop import run_loop
run_loop(load_loop_config({str(CONFIG)!r}, rounds=1), path)
"""


def content(store: ArtifactStore) -> dict[str, list[str]]:
    """Every ref with the checksums of its artifact's files: equal content, not just equal ids."""
    return {name: artifact_checksums(store, ref) for name, ref in store.refs().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "store"
    summary = run_loop(load_loop_config(CONFIG, rounds=1), str(path))
    return ArtifactStore(path), len(summary.stages)


@pytest.mark.parametrize("kill_after", [0, 2, 4, 6, 8])
def test_killed_run_resumes_with_only_the_unfinished_work(uninterrupted, tmp_path, kill_after):
    whole, total_stages = uninterrupted
    path = tmp_path / "store"
    marker = tmp_path / "waiting"
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_UNTIL, str(path), str(kill_after), str(marker)], start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached its kill point (exit code {process.poll()})"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    store = ArtifactStore(path)
    finished = len(store.list())
    assert finished == kill_after < total_stages
    assert list((Path(store.base) / "tmp").iterdir()), "the kill left no half-written artifact behind"

    summary = run_loop(load_loop_config(CONFIG, rounds=1), str(path))
    computed = [s.stage for s in summary.stages if not s.cached]
    assert len(computed) == total_stages - finished
    assert content(store) == content(whole)


def test_two_concurrent_runs_make_one_copy_of_each_artifact(uninterrupted, tmp_path):
    whole, total_stages = uninterrupted
    path = tmp_path / "store"
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(path)]) for _ in range(2)]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    store = ArtifactStore(path)
    assert len(store.list()) == total_stages
    for ref in store.list():
        store.verify(ref)  # no torn or mixed files
    assert content(store) == content(whole)
    assert list((Path(store.base) / "tmp").iterdir()) == []  # the loser of each race cleaned up
