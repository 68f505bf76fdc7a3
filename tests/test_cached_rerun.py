"""A finished run reruns from the store alone: the loop's wiring walked with lookups only, before Prefect.

``prefloop run`` first calls :func:`prefloop.flows.loop.lookup_loop`; a finished run is reprinted
without importing Prefect or starting its server, and a run with a stage missing runs as a Prefect
flow that computes exactly that stage (the others are lookups, shown as "Cached" task runs).

Stage counts of ``configs/smoke.yaml`` (2 rounds, fixed reference), by hand: before the rounds
``prompts``, ``sft-prompts``, ``sft``, ``evaluate`` = 4; each round ``sample``, ``label``,
``construct``, ``filter``, ``reference``, ``train``, ``evaluate`` = 7; in all 4 + 2 × 7 = 18. The walk
reaches round 1's ``filter`` as its 4 + 4 = 8th stage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.config import load_loop_config
from prefloop.flows import loop as loop_module
from prefloop.flows.loop import LoopSummary, lookup_loop, run_loop
from prefloop.orchestration import StageNotInStore, lookup_caller
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_STAGES = 18  # 4 + 2 rounds x 7 (module docstring)
ROUND_1_FILTER_POSITION = 8  # 4 + sample, label, construct, filter
DELETED = "smoke/round-1/preferences-filtered"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, LoopSummary]:
    """A finished smoke run, computed directly (no Prefect)."""
    store = tmp_path_factory.mktemp("cached-rerun") / "store"
    summary = run_loop(load_loop_config(SMOKE), str(store))
    assert len(summary.stages) == SMOKE_STAGES and not any(stage.cached for stage in summary.stages)
    return store, summary


def test_lookup_pass_finds_a_finished_run_completely(finished) -> None:
    store, computed = finished
    found = lookup_loop(load_loop_config(SMOKE), str(store))
    assert [stage.output for stage in found.stages] == [stage.output for stage in computed.stages]
    assert len(found.stages) == SMOKE_STAGES and all(stage.cached for stage in found.stages)
    # The stored results carry what the wiring branches on (rows) and what the summary prints.
    assert [stage.rows for stage in found.stages] == [stage.rows for stage in computed.stages]
    assert [r.policy for r in found.rounds] == [r.policy for r in computed.rounds]


def test_cli_reruns_a_finished_run_without_importing_prefect(finished, tmp_path) -> None:
    store, _ = finished
    code = textwrap.dedent(f"""
        import sys
        from prefloop.cli import app
        try:
            app(["run", "--config", {str(SMOKE)!r}, "--store", {str(store)!r}])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        print("PREFECT MODULES", sorted(m for m in sys.modules if m.split(".")[0] == "prefect"))
    """)
    # As a newcomer types it: no server running, Prefect's home under the project (here a scratch one).
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{SMOKE_STAGES} stages: 0 computed, {SMOKE_STAGES} cached" in output
    assert "no Prefect flow run was started" in output
    assert "PREFECT MODULES []" in output, output
    assert not (tmp_path / "prefect").exists()  # no server, no database


def test_lookup_pass_stops_at_the_first_missing_stage(finished, tmp_path, monkeypatch) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(finished[0], store_path)
    store = ArtifactStore(store_path)
    deleted = store.resolve(DELETED)
    shutil.rmtree(store._artifact_dir(deleted))
    calls: list[str] = []

    def spy(stage, inputs, config, store_uri, name):
        calls.append(name)
        return lookup_caller(stage, inputs, config, store_uri, name)

    monkeypatch.setattr(loop_module, "lookup_caller", spy)
    with pytest.raises(StageNotInStore) as missing:
        lookup_loop(load_loop_config(SMOKE), str(store_path))
    assert (missing.value.stage, missing.value.name) == ("filter", DELETED)
    assert len(calls) == ROUND_1_FILTER_POSITION and calls[-1] == DELETED  # nothing after the miss is asked
    assert not store.exists(deleted)  # a lookup computes nothing


def test_import_stage_counts_as_a_miss(tmp_path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "1+1", "reference_answer": "2"}\n')
    with pytest.raises(StageNotInStore, match="known only by reading its whole source"):
        lookup_caller("import-prompts", {}, {"source": str(source)}, str(tmp_path / "store"), "mine/prompts")


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_runs() -> list:
    from prefect.client.orchestration import get_client

    async def read() -> list:
        async with get_client() as client:
            return await client.read_flow_runs()

    return asyncio.run(read())


def _task_run_states(flow_run_id, expected: int, timeout_s: float = 30.0) -> list[str]:
    """The state names of a flow run's task runs, once the server has recorded ``expected`` final ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               limit=200)

    deadline = time.monotonic() + timeout_s
    while True:
        runs = asyncio.run(read())
        if (len(runs) >= expected and all(run.state and run.state.is_final() for run in runs)) \
                or time.monotonic() > deadline:
            return sorted(run.state.name for run in runs if run.state)
        time.sleep(0.2)


def test_missing_stage_runs_as_a_flow_that_computes_exactly_it(finished, tmp_path, prefect_server) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(finished[0], store_path)
    runner = CliRunner()
    complete = runner.invoke(app, ["run", "--config", str(SMOKE), "--store", str(store_path)])
    assert complete.exit_code == 0, complete.output
    assert _flow_runs() == []  # a finished run starts no flow run

    store = ArtifactStore(store_path)
    deleted = store.resolve(DELETED)
    shutil.rmtree(store._artifact_dir(deleted))
    rerun = runner.invoke(app, ["run", "--config", str(SMOKE), "--store", str(store_path)])
    assert rerun.exit_code == 0, rerun.output
    assert f"stage 'filter' -> {DELETED}: not in the store yet" in rerun.output
    assert f"{SMOKE_STAGES} stages: 1 computed, {SMOKE_STAGES - 1} cached" in rerun.output
    assert store.exists(deleted)  # the same id again: the same inputs and config
    (flow_run,) = _flow_runs()
    assert flow_run.name and flow_run.state and flow_run.state.is_completed()
    # Every stage is in Prefect: the one that computed, and the lookups as "Cached" task runs.
    states = _task_run_states(flow_run.id, SMOKE_STAGES)
    assert states == ["Cached"] * (SMOKE_STAGES - 1) + ["Completed"]


def test_loop_flows_are_still_prefect_flows_for_deployments() -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    loaded = load_flow_from_entrypoint(f"{ROOT / 'flows' / 'loop.py'}:loop_flow")
    assert isinstance(loaded, Flow) and loaded.name == "prefloop-loop"
    assert {"config", "store", "reward_model", "dispatch"} <= set(loaded.parameters.properties)
    assert isinstance(loop_module.round_flow, Flow) and loop_module.round_flow.name == "prefloop-round"
    assert loop_module.loop_flow is loop_module.loop_flow  # made once, then a plain module attribute
