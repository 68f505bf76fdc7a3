"""Round reports and comparisons on a smoke run through Prefect, plus the bad inputs a report must survive:
one round only, a metrics artifact from an older evaluate version, and no reward model."""

import re
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.datasets_spec import METRICS
from prefloop.report import NO_REWARD_MODEL_NOTE, ReportError, compare_runs, load_run, write_report
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PLOTS = {"accuracy_winrate", "reward_kl", "length", "drops", "margins"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke loop cut to one round (rounds 0 and 1), through an ephemeral Prefect server."""
    from prefect.testing.utilities import prefect_test_harness

    from prefloop.config import load_loop_config
    from prefloop.flows.loop import loop_flow

    store = ArtifactStore(tmp_path_factory.mktemp("report") / "store")
    config = load_loop_config(ROOT / "configs/smoke.yaml", rounds=1)
    # Shrunk further: the report needs every stage to run, not a good model.
    config = config.model_copy(update={
        "sft": config.sft.model_copy(update={"training": config.sft.training.model_copy(update={"max_steps": 30})}),
        "evaluation": config.evaluation.model_copy(update={"samples_per_prompt": 4, "pass_k": (1, 4)}),
    })
    from prefloop import orchestration

    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as patch:
        # The smoke stages are short: show progress from the first step (normally after 2 s).
        patch.setattr(orchestration, "PROGRESS_EVERY_SECONDS", 0.0)
        loop_flow(config, store=store.uri)
        yield store, _read_prefect_artifacts()


def _read_prefect_artifacts():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_artifacts()


def _stored_rows(store, ref_name):
    return {r["metric"]: r for r in store.read_table(store.resolve(ref_name)).to_pylist()}


def test_report_of_a_smoke_run_has_every_plot_and_the_stored_values(smoke, tmp_path):
    store, _ = smoke
    files = write_report(store, "smoke", tmp_path / "out")
    assert set(files.plots) == PLOTS
    for path in files.plots.values():
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000
    page = files.html.read_text()
    assert page.count("src='data:image/png;base64,") == len(PLOTS)  # self-contained: no server, no side files
    assert not re.search(r"src=['\"](?!data:)", page)
    markdown = files.markdown.read_text()
    assert all(f"]({name}.png)" in markdown for name in PLOTS)
    # every stored value of every round appears, as stored, in both pages
    for index in (0, 1):
        for metric, row in _stored_rows(store, f"smoke/round-{index}/metrics").items():
            if row["value"] is not None:
                assert f"{row['value']:.6g}" in markdown and f"{row['value']:.6g}" in page, (index, metric)
    # the summary table's accuracy is the stored one, in percent ± SE
    accuracy = _stored_rows(store, "smoke/round-1/metrics")["accuracy"]
    assert f"{accuracy['value'] * 100:.1f} ± {accuracy['stderr'] * 100:.1f}%" in markdown
    # no reward model in the smoke config: the report says so instead of failing
    assert NO_REWARD_MODEL_NOTE in markdown and "no reward model configured" in page
    assert "round 0" in markdown and "no previous round" in markdown


def test_report_command_writes_the_pages(smoke, tmp_path):
    store, _ = smoke
    result = runner.invoke(app, ["report", "smoke", "--out", str(tmp_path / "r"), "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "report.md").exists()
    assert "file://" in result.output and "no reward model configured" in result.output
    missing = runner.invoke(app, ["report", "nosuchrun", "--store", store.uri])
    assert missing.exit_code == 2 and "has no metrics" in missing.output and "prefloop ls" in missing.output


def test_flow_run_publishes_prefect_artifacts(smoke):
    _, artifacts = smoke
    by_key = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    assert by_key["smoke-round-1-metrics"][0].type == "table"  # the evaluate stage's metrics and drops
    assert by_key["smoke-round-1-preferences-filtered"][0].type == "table"
    assert by_key["smoke-round-1-report"][0].type == "markdown"
    assert "accuracy" in by_key["smoke-round-1-report"][0].data
    assert by_key["smoke-round-0-report"][0].type == "markdown"
    assert by_key["smoke-summary"][0].type == "table" and by_key["smoke-report"][0].type == "markdown"
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress and all(a.flow_run_id is not None for a in progress)
    assert any(float(a.data) == 100.0 for a in progress)
    assert all(a.flow_run_id is not None for a in by_key["smoke-round-1-metrics"])


def test_a_run_with_one_round_renders_and_says_why_there_is_no_win_rate(smoke, tmp_path):
    store, _ = smoke
    store.set_ref("solo/round-0/metrics", store.resolve("smoke/round-0/metrics"))
    metrics = load_run(store, "solo")
    assert [r.round for r in metrics.rounds] == [0]
    assert any("one evaluated round" in note for note in metrics.notes)
    files = write_report(store, "solo", tmp_path / "solo")
    assert set(files.plots) == PLOTS
    markdown = files.markdown.read_text()
    assert "no previous round" in markdown and "–" in markdown  # win rates shown as missing


def _old_metrics(store, round_index, rows):
    class Empty(StageConfig):
        round: int = 0

    # evaluate@1 wrote only accuracy, gain, length and truncated rate (and no stderr on some)
    spec = StageSpec("evaluate", "1", Empty, "metrics", {}, METRICS)
    table = pa.Table.from_pylist([{"round": round_index, "split": "heldout", "stderr": None, "count": 10, **row}
                                  for row in rows], schema=METRICS.schema)
    return execute(spec, lambda ctx: StageOutput(table=table, metrics={r["metric"]: r["value"] for r in rows}),
                   {}, {"round": round_index}, store, f"old/round-{round_index}/metrics")


def test_metrics_from_an_older_evaluate_version_still_render(store, tmp_path):
    _old_metrics(store, 0, [{"metric": "accuracy", "value": 0.5, "stderr": 0.1}, {"metric": "mean_length", "value": 12.0}])
    _old_metrics(store, 1, [{"metric": "accuracy", "value": 0.6, "stderr": 0.1},
                            {"metric": "accuracy_gain", "value": 0.1, "stderr": 0.05}])
    metrics = load_run(store, "old")
    round_one = metrics.rounds[1]
    assert any("evaluate@1" in note and "pass@1" in note for note in round_one.notes)
    assert any("'mean_length' is missing" in note for note in round_one.notes)
    files = write_report(store, "old", tmp_path / "old")
    markdown = files.markdown.read_text()
    assert "60.0 ± 10.0%" in markdown and "+10.0 ± 5.0%" in markdown
    assert "evaluate@1" in markdown and NO_REWARD_MODEL_NOTE in markdown
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in files.plots.values())


def test_compare_puts_two_runs_side_by_side(smoke, tmp_path):
    smoke_store, _ = smoke
    _old_metrics(smoke_store, 0, [{"metric": "accuracy", "value": 0.25, "stderr": 0.1}])
    header, rows = compare_runs(load_run(smoke_store, "smoke"), load_run(smoke_store, "old"))
    assert header == ["metric", "smoke (round 1)", "old (round 0)", "B − A"]
    accuracy = next(row for row in rows if row[0] == "accuracy")
    stored = _stored_rows(smoke_store, "smoke/round-1/metrics")["accuracy"]["value"]
    assert accuracy[2] == "25.0 ± 10.0%" and accuracy[3] == f"{(0.25 - stored) * 100:+.1f}%"
    assert next(row for row in rows if row[0] == "kl_to_reference")[2] == "–"
    result = runner.invoke(app, ["compare", "smoke", "old", "--store", smoke_store.uri, "--markdown",
                                 str(tmp_path / "c.md")])
    assert result.exit_code == 0, result.output
    assert "smoke vs old" in result.output and "accuracy by round" in result.output
    assert "| accuracy |" in (tmp_path / "c.md").read_text()
    with pytest.raises(ReportError, match="no metrics for round 7"):
        compare_runs(load_run(smoke_store, "smoke"), load_run(smoke_store, "old"), round_second=7)
