"""The cheap paths that keep a Prefect flow close to the stage cores called directly (issue 19, item 5),
without a Prefect server: the settings copy, the task-run name, one log record per stage, and where the
wait for the Prefect artifacts happens. tests/test_local_flow.py runs them against the ephemeral server."""

from __future__ import annotations

import threading
import time

import pytest

from prefloop import orchestration
from prefloop.stage import StageResult
from prefloop.tasks.registry import StageEntry


@pytest.fixture
def ephemeral():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        if PREFECT_API_URL.value():
            pytest.skip("PREFECT_API_URL is set: these tests are about the ephemeral server")
        yield


def test_local_flow_settings_switch_heartbeats_off_without_rebuilding_every_setting(ephemeral, monkeypatch):
    from prefect.settings import Settings, get_current_settings

    before = get_current_settings()

    def rebuilt(*args, **kwargs):
        raise AssertionError("every setting re-validated (about 0.1 s) for one field")

    monkeypatch.setattr(Settings, "copy_with_update", rebuilt)
    with orchestration.local_flow_settings():
        inside = get_current_settings()
        assert inside.flows.heartbeat_frequency is None
        # Everything else is the settings in force before, unchanged.
        assert inside.api == before.api and inside.home == before.home and inside.results == before.results
        assert inside.model_dump(exclude={"flows"}) == before.model_dump(exclude={"flows"})
    assert get_current_settings() is before


def test_a_real_server_keeps_prefect_s_heartbeats(monkeypatch):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        expected = get_current_settings().flows.heartbeat_frequency
        with orchestration.local_flow_settings():
            assert get_current_settings().flows.heartbeat_frequency == expected is not None


def _fake_result(cached: bool) -> StageResult:
    return StageResult(stage="prompts", output="prompts/abc", cached=cached, rows=48, drops={"too_long": 2},
                       metrics={"accuracy": 0.5, "accuracy_stderr": 0.1}, seconds=1.25, name="demo/prompts")


@pytest.mark.parametrize("cached", [False, True])
def test_a_stage_task_says_what_happened_in_its_final_state(monkeypatch, cached):
    """One log record per stage: Prefect's "Finished in state Completed('computed in ...')" line carries
    the stage's outcome, and a computed stage publishes its table artifact (a lookup does not)."""
    from prefect import State

    monkeypatch.setattr(StageEntry, "run", lambda self, inputs, config, store, name=None: _fake_result(cached))
    published = []
    monkeypatch.setattr(orchestration, "_publish", lambda what, create: published.append(what))
    stage_task = orchestration.prefect_stage_task("prompts")
    state = stage_task.fn({}, {}, "/nowhere", "demo/prompts")
    assert isinstance(state, State) and state.is_completed() and state.data == _fake_result(cached)
    if cached:
        assert state.name == "Cached" and state.message == "found prompts/abc in the store" and published == []
    else:
        assert state.name == "Completed"
        assert state.message == "computed in 1.2s, 48 rows, dropped 2: prompts/abc"
        assert published == ["table"]


def test_stage_task_runs_are_named_from_their_parameters():
    """The task-run name comes from the call's ``name`` parameter, so no call builds a Task copy
    (``with_options``, about 5 ms each)."""
    stage_task = orchestration.prefect_stage_task("prompts")
    name = stage_task.task_run_name
    assert callable(name)
    assert name(parameters={"inputs": {}, "config": {}, "store": "s", "name": "demo/prompts"}) == "demo/prompts"
    assert name(parameters={"inputs": {}, "config": {}, "store": "s", "name": None}) == "prompts"


def test_call_stage_task_builds_no_task_copy(monkeypatch):
    from prefect import Task

    def copied(self, *args, **kwargs):
        raise AssertionError("with_options builds a new Task on every stage call")

    monkeypatch.setattr(Task, "with_options", copied)
    calls = []
    monkeypatch.setattr(orchestration, "prefect_stage_task",
                        lambda stage: lambda *args: calls.append(args) or _fake_result(False))
    assert orchestration.call_stage_task("prompts", {}, {}, "/nowhere", "demo/prompts") == _fake_result(False)
    assert calls == [({}, {}, "/nowhere", "demo/prompts")]


def _slow_publish(done: list[float]) -> None:
    orchestration._publish("test", lambda: (time.sleep(0.2), done.append(time.monotonic())))


def test_a_flow_s_final_wait_blocks_until_its_artifacts_are_written():
    """A flow run by a worker (a deployment) waits for its artifacts before it ends."""
    done: list[float] = []
    _slow_publish(done)
    orchestration.wait_for_artifacts()
    assert len(done) == 1


def test_under_run_flow_locally_the_caller_waits_for_the_artifacts_instead():
    """Inside run_flow_locally the flow's final wait returns at once; run_flow_locally drains later,
    while the server records the run."""
    done: list[float] = []
    token = orchestration._caller_waits_for_artifacts.set(True)
    try:
        _slow_publish(done)
        began = time.monotonic()
        orchestration.wait_for_artifacts()
        assert done == [] and time.monotonic() - began < 0.15
    finally:
        orchestration._caller_waits_for_artifacts.reset(token)
    orchestration._drain_artifacts()
    assert len(done) == 1 and not orchestration._pending


def test_artifacts_publish_in_order_on_one_thread():
    seen: list[tuple[int, str]] = []
    for index in range(5):
        orchestration._publish("test", lambda index=index: seen.append((index, threading.current_thread().name)))
    orchestration.wait_for_artifacts()
    assert [index for index, _ in seen] == list(range(5))
    assert {name for _, name in seen} != {threading.current_thread().name}


def test_the_early_server_start_also_starts_the_events_worker(ephemeral, monkeypatch):
    """``prefloop run`` starts the throw-away server while it imports torch; the events worker's websocket
    connects there too, not at the flow's first task run."""
    from prefect.events.worker import EventsWorker
    from prefect.server.api.server import SubprocessASGIServer

    calls = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, *args, **kwargs: calls.append("server"))
    monkeypatch.setattr(EventsWorker, "instance", classmethod(lambda cls, *args: calls.append("events worker")))
    monkeypatch.setattr(orchestration, "_early_server", [])
    orchestration.start_ephemeral_server_early()
    for thread in orchestration._early_server:
        thread.join(timeout=10)
    assert calls == ["server", "events worker"]
