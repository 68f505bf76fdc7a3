"""A real local Prefect server: register the deployments, start a cpu worker, trigger the smoke
loop through the API, wait for it, and check the store and the run. Stops all it started."""

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from prefloop.flows import deploy
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except Exception:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    port = free_port()
    url = deploy.api_url("127.0.0.1", port)
    process = deploy.start_server("127.0.0.1", port, log=tmp_path / "server.log")
    monkeypatch.setenv("PREFECT_API_URL", url)
    yield url, tmp_path
    stop(process)


def test_deployments_run_on_a_worker(server):
    url, tmp_path = server
    deploy.deploy_all(url)
    worker = deploy.start_worker("cpu", url, log=tmp_path / "worker.log")
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        config = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()) | {"rounds": 1}
        store = tmp_path / "store"
        with temporary_settings({PREFECT_API_URL: url}):
            started = time.monotonic()
            run = run_deployment("prefloop-loop/loop", parameters={"config": config, "store": str(store)},
                                 timeout=600)
        assert run.state.is_completed(), (run.state, (tmp_path / "worker.log").read_text()[-3000:])
        assert time.monotonic() - started < 600
        refs = ArtifactStore(store).refs("smoke/")
        assert "smoke/round-1/metrics" in refs and "smoke/round-1/policy" in refs
    finally:
        stop(worker)
