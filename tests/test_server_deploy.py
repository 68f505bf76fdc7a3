"""A real local Prefect server: register the deployments, start a cpu and a gpu worker, trigger
the smoke loop through the API, wait for it, and check the store and where each stage ran (the
GPU-heavy stages as their own deployments on the gpu pool). Stops all it started."""

import os
import signal
import socket
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
    workers = [deploy.start_worker(pool, url, log=tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
        )
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        config = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()) | {"rounds": 1}
        store = tmp_path / "store"
        with temporary_settings({PREFECT_API_URL: url}):
            # The deployment's own parameters (prefect.yaml) choose dispatch "pools".
            run = run_deployment("prefloop-loop/loop", parameters={"config": config, "store": str(store)},
                                 timeout=900)
            logs = "\n".join((tmp_path / f"worker-{pool}.log").read_text()[-2000:] for pool in ("cpu", "gpu"))
            assert run.state.is_completed(), (run.state, logs)
            assert run.work_pool_name == "cpu"
            with get_client(sync_client=True) as client:
                children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
                # The Prefect artifacts on the loop's run: the round report, the run summary and report,
                # and a table per stage computed in the loop's own run (prompts, label, construct, filter).
                artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        keys = {artifact.key for artifact in artifacts if artifact.key}
        assert {"smoke-round-1-report", "smoke-summary", "smoke-report", "smoke-round-1-preferences"} <= keys, keys
        summary = next(a for a in artifacts if a.key == "smoke-summary")
        assert summary.type == "table" and "round" in str(summary.data), summary.data
        refs = ArtifactStore(store).refs("smoke/")
        assert "smoke/round-1/metrics" in refs and "smoke/round-1/policy" in refs
        # sft, the round-0 evaluation, sample, the reference log-probs, train and the round-1
        # evaluation each ran as their stage deployment on the gpu pool; prompts, label, construct
        # and filter ran in the loop's own run.
        dispatched = sorted(child.parameters["name"] for child in children)
        assert dispatched == sorted(["smoke/round-0/policy", "smoke/round-0/metrics", "smoke/round-1/samples",
                                     "smoke/round-1/reference-logps", "smoke/round-1/policy",
                                     "smoke/round-1/metrics"]), dispatched
        assert {child.work_pool_name for child in children} == {"gpu"}
        assert all(child.state.is_completed() for child in children)
    finally:
        for worker in workers:
            stop(worker)
