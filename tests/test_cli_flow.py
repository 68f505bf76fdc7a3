"""End to end: the smoke config through Prefect via the CLI, then every inspection command."""

import json
from pathlib import Path

import pytest
from helpers import artifact_checksums
from typer.testing import CliRunner

from prefloop.cli import app
from prefloop.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def prefect_env():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def smoke(prefect_env, tmp_path_factory):
    store = tmp_path_factory.mktemp("cli") / "store"
    result = runner.invoke(app, ["run", "--config", str(ROOT / "configs/smoke.yaml"), "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store, result.output


def cli(*args):
    result = runner.invoke(app, [*map(str, args)])
    return result


def test_loop_writes_every_round(smoke):
    store_path, output = smoke
    store = ArtifactStore(store_path)
    refs = store.refs("smoke/")
    for round_index in (1, 2):
        for stage in ("samples", "labels", "preferences", "preferences-filtered", "metrics"):
            assert f"smoke/round-{round_index}/{stage}" in refs
    assert "smoke/round-0/policy" in refs and "smoke/round-0/metrics" in refs
    assert "run 'smoke'" in output and "accuracy" in output
    manifest = store.read_manifest(refs["smoke/round-2/metrics"])
    assert manifest.inputs["baseline"] == str(refs["smoke/round-0/metrics"])
    assert manifest.config["round"] == 2
    samples = store.read_manifest(refs["smoke/round-2/samples"])
    # Round 1 of the smoke config keeps pairs (else this would not test chaining), so round 2 samples from
    # exactly round 1's policy, never the SFT one.
    assert store.read_manifest(refs["smoke/round-1/preferences-filtered"]).rows > 0
    assert samples.inputs["policy"] == str(refs["smoke/round-1/policy"])


def test_rerun_recomputes_nothing(smoke):
    store_path, _ = smoke
    result = cli("run", "--config", ROOT / "configs/smoke.yaml", "--store", store_path)
    assert result.exit_code == 0, result.output
    assert "18 stages: 0 computed, 18 cached" in result.output
    # Every stage was found before Prefect was needed: no flow run (tests/test_cached_rerun.py checks that a
    # run with something to compute shows the found stages as "Cached" task runs).
    assert "no Prefect flow run was started" in result.output


def test_rerun_without_prefect_looks_up_the_same_artifacts(smoke):
    store_path, _ = smoke
    result = cli("run", "--config", ROOT / "configs/smoke.yaml", "--store", store_path, "--no-prefect")
    assert result.exit_code == 0, result.output
    assert "18 stages: 0 computed, 18 cached" in result.output


def test_stage_runs_alone_and_is_cached(smoke):
    store_path, _ = smoke
    # The loop's filter is decontaminated against the evaluation prompts: the same inputs here.
    result = cli("stage", "filter", "--config", ROOT / "configs/smoke.yaml", "--input",
                 "preferences=smoke/round-1/preferences", "--input", "eval_prompts=smoke/prompts",
                 "--name", "smoke/adhoc/filtered", "--store", store_path)
    assert result.exit_code == 0, result.output
    assert "cached" in result.output  # same inputs and config as inside the loop
    store = ArtifactStore(store_path)
    assert store.resolve("smoke/adhoc/filtered") == store.resolve("smoke/round-1/preferences-filtered")
    changed = cli("stage", "filter", "--input", "preferences=smoke/round-1/preferences", "--store", store_path,
                  "--config", _write_yaml(store_path.parent / "f.yaml", "min_margin: 0.5\n"))
    assert changed.exit_code == 0 and "computed" in changed.output


def _write_yaml(path, text):
    path.write_text(text)
    return path


def test_export_trl_loads_with_datasets(smoke, tmp_path):
    store_path, _ = smoke
    result = cli("export", "smoke/round-1/preferences", "--format", "trl", "--out", tmp_path / "trl", "--store", store_path)
    assert result.exit_code == 0, result.output
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl" / "train.parquet"), split="train")
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert dataset.num_rows == ArtifactStore(store_path).read_manifest(
        ArtifactStore(store_path).resolve("smoke/round-1/preferences")).rows
    jsonl = cli("export", "smoke/round-1/samples", "--format", "jsonl", "--out", tmp_path / "j", "--store", store_path)
    assert jsonl.exit_code == 0
    assert len((tmp_path / "j" / "samples.jsonl").read_text().splitlines()) > 0
    wrong = cli("export", "smoke/round-1/samples", "--format", "trl", "--out", tmp_path / "x", "--store", store_path)
    assert wrong.exit_code == 2 and "needs a preferences artifact" in wrong.output


def test_inspection_commands(smoke):
    store_path, _ = smoke
    listing = cli("ls", "smoke/", "--store", store_path)
    assert listing.exit_code == 0 and "smoke/round-1/preferences" in listing.output
    shown = cli("show", "smoke/round-1/preferences-filtered", "--json", "--store", store_path)
    manifest = json.loads(shown.output)
    assert manifest["stage"] == "filter" and manifest["validation"]["data"]["suite"]["success"]
    lineage = cli("lineage", "smoke/round-1/policy", "--store", store_path)
    assert lineage.exit_code == 0 and "sft@2" in lineage.output and "construct@3" in lineage.output
    valid = cli("validate", "smoke/round-1/samples", "--store", store_path)
    assert valid.exit_code == 0 and "checksums: ok" in valid.output
    dry = cli("gc", "--dry-run", "--store", store_path)
    assert dry.exit_code == 0


def test_validate_refuses_a_tampered_artifact(smoke, tmp_path):
    import shutil

    store_path, _ = smoke
    copy = tmp_path / "store"
    shutil.copytree(store_path, copy)
    store = ArtifactStore(copy)
    ref = store.resolve("smoke/round-1/labels")
    part = Path(store.base) / "artifacts" / ref.kind / ref.id / "data" / "part-00000.parquet"
    part.write_bytes(part.read_bytes().replace(b"PAR1", b"PAR2", 1))
    result = cli("validate", "smoke/round-1/labels", "--store", copy)
    assert result.exit_code == 2 and "damaged" in result.output


def test_clear_errors(tmp_path):
    missing = cli("run", "--config", tmp_path / "nope.yaml", "--store", tmp_path / "s")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = _write_yaml(tmp_path / "bad.yaml", "rounds: 2\nsampling: {n: 0}\n")
    invalid = cli("run", "--config", bad, "--store", tmp_path / "s")
    assert invalid.exit_code == 2 and "sampling.n" in invalid.output
    no_rm = cli("run", "--config", ROOT / "configs/smoke.yaml", "--reward-model", "rm/none", "--store", tmp_path / "s")
    assert no_rm.exit_code == 2 and "rm/none" in no_rm.output
    unknown = cli("show", "nothing/here", "--store", tmp_path / "s")
    assert unknown.exit_code == 2 and "prefloop ls" in unknown.output
    stage = cli("stage", "filtr", "--store", tmp_path / "s")
    assert stage.exit_code == 2 and "stages:" in stage.output


def test_the_same_wiring_without_prefect_gives_the_same_artifacts(smoke, tmp_path):
    """run_loop (stage cores called directly) and the Prefect flow make identical artifacts."""
    from prefloop.config import load_loop_config
    from prefloop.flows.loop import run_loop

    store_path, _ = smoke
    flow_store = ArtifactStore(store_path)
    direct = run_loop(load_loop_config(ROOT / "configs/smoke.yaml"), str(tmp_path / "direct"))
    assert not any(stage.cached for stage in direct.stages)
    direct_store = ArtifactStore(tmp_path / "direct")
    refs = direct_store.refs("smoke/")
    assert refs == {name: ref for name, ref in flow_store.refs("smoke/").items() if not name.startswith("smoke/adhoc")}

    # Same seeds, same CPU: same samples, pairs, weights and metrics, byte for byte.
    for name in ("smoke/round-1/samples", "smoke/round-1/preferences", "smoke/round-2/labels"):
        assert artifact_checksums(direct_store, refs[name]) == artifact_checksums(flow_store, refs[name]), name
