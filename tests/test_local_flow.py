"""Flows run in-process against Prefect's ephemeral server (what `prefloop run` does): when the call
returns, the server has recorded every task run in a final state, and every Prefect artifact the flow
published is written, so stopping it at exit loses nothing."""

import time
import uuid

import pytest
from prefect import flow, task

from prefloop import orchestration
from prefloop.orchestration import run_flow_locally


@task
def double(value: int) -> int:
    return 2 * value


@flow(name="prefloop-test-local")
def three_tasks(start: int) -> list[int]:
    return [double(start), double(start + 1), double(start + 2)]


@flow(name="prefloop-test-local-failing")
def failing() -> None:
    double(1)
    raise ValueError("the stage said no")


@flow(name="prefloop-test-late-artifact")
def late_artifact(key: str) -> str:
    """Publishes its report as the loop's flows do: in the background, then waits for it last."""
    from prefect.artifacts import create_markdown_artifact

    orchestration._publish("report", lambda: (time.sleep(0.5), create_markdown_artifact("# report", key=key)))
    orchestration.wait_for_artifacts()
    return key


@pytest.fixture
def ephemeral():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        if PREFECT_API_URL.value():
            pytest.skip("PREFECT_API_URL is set: these tests are about the ephemeral server")
        yield


def test_run_flow_locally_returns_the_result_with_every_task_run_recorded(ephemeral):
    """End to end on the ephemeral server (the wait itself is pinned down by the fake-client test below,
    since a real server usually records a run this small before anyone looks)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    name = f"local-three-{uuid.uuid4().hex}"
    assert run_flow_locally(three_tasks.with_options(flow_run_name=name), 5, expected_task_runs=len) == [10, 12, 14]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 3
    assert all(run.state is not None and run.state.is_completed() for run in runs), [run.state for run in runs]


def test_run_flow_locally_raises_the_flow_s_error(ephemeral):
    with pytest.raises(ValueError, match="the stage said no"):
        run_flow_locally(failing)


def test_artifacts_published_last_are_written_after_the_flow_run_ends_and_before_the_call_returns(ephemeral):
    """Under run_flow_locally the flow's own final wait is left to the caller: the flow run finishes (and the
    server records it) while its last artifacts are written, on an API client kept open until they are."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"late-{uuid.uuid4().hex}"
    assert run_flow_locally(late_artifact, key) == key
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        flow_run = client.read_flow_run(artifact.flow_run_id)
    assert artifact.data == "# report" and flow_run.state.is_completed()
    assert artifact.created > flow_run.end_time  # written after the flow run ended, still on its run


def test_waits_until_the_server_shows_every_task_run_final(monkeypatch):
    """Against the ephemeral server the wait polls until the expected task runs exist and are all final."""
    import contextlib
    from types import SimpleNamespace

    import prefect
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Running

    from prefloop import orchestration

    views = iter([[], [SimpleNamespace(state=Running())],
                  [SimpleNamespace(state=Completed()), SimpleNamespace(state=Running())],
                  [SimpleNamespace(state=Completed()), SimpleNamespace(state=Completed())]])
    reads, order = [], []

    class Client:
        def read_task_runs(self, flow_run_filter):
            reads.append(flow_run_filter)
            order.append("read")
            return next(views)

    monkeypatch.setattr(prefect, "get_client", lambda sync_client: contextlib.nullcontext(Client()))
    monkeypatch.setattr(EventsWorker, "drain_all", classmethod(lambda cls, timeout=None: order.append("drain events")))
    monkeypatch.setattr(APILogWorker, "drain_all", classmethod(lambda cls, timeout=None: order.append("drain")))
    monkeypatch.setattr(orchestration.time, "sleep", lambda seconds: None)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        orchestration.wait_until_recorded(uuid.UUID(int=7), expected=2)
    assert len(reads) == 4  # returned at the first view with both task runs final
    # The logs are drained once the events are recorded (draining stops the events worker too; with its
    # queue already empty that prints no "Still processing items" warning).
    assert order == ["read"] * 4 + ["drain"]
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        orchestration.wait_until_recorded(uuid.UUID(int=7), expected=2)
    assert len(reads) == 4  # a real server outlives the process: no wait
