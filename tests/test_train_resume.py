"""The train stage in the store: checkpoints and resume, cached reference log-probs, bad inputs."""

import contextlib
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from helpers import arithmetic_pairs, artifact_checksums

from prefloop.datasets_spec import PREFERENCES
from prefloop.stage import StageConfig, StageInputError, StageOutput, StageSpec, execute, set_progress_factory
from prefloop.storage import ArtifactStore, TamperedArtifactError
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training import preference, sft
from prefloop.tasks.training.artifacts import StoreCheckpointer

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}
TRAIN = {"training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2}}


class Empty(StageConfig):
    pass


def put_pairs(store: ArtifactStore, table: pa.Table, name: str = "pairs"):
    spec = StageSpec(f"hand-{name}", "1", Empty, "preferences", {}, PREFERENCES)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A store holding a tiny SFT model and 16 preference pairs (built once, copied per test)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train-inputs") / "store"
    store = ArtifactStore(root)
    made = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 0, "task": {"min_ops": 1, "max_ops": 1}}, store)
    model = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}},
                    store)
    pairs = put_pairs(store, arithmetic_pairs(16))
    return root, {"preferences": pairs.output, "policy": model.output, "reference": model.output}


@pytest.fixture
def copy_of(inputs, tmp_path):
    """A fresh store with the shared inputs, and the train inputs."""
    root, train_inputs = inputs

    def make(name: str = "store") -> tuple[ArtifactStore, dict[str, str]]:
        shutil.copytree(root, tmp_path / name)
        return ArtifactStore(tmp_path / name), dict(train_inputs)

    return make


class Killed(Exception):
    pass


@contextlib.contextmanager
def killed_after(step: int):
    """Make training raise right after optimizer step ``step`` (as if the process had been killed)."""

    @contextlib.contextmanager
    def factory(total: int, description: str):
        done = [0]

        def advance(count: int = 1) -> None:
            done[0] += count
            if "steps" in description and done[0] >= step:
                raise Killed(f"killed after step {done[0]}")

        yield advance

    set_progress_factory(factory)
    try:
        yield
    finally:
        set_progress_factory(None)


def test_a_killed_training_resumes_and_ends_with_the_same_weights(copy_of) -> None:
    uninterrupted_store, train_inputs = copy_of("uninterrupted")
    uninterrupted = run_stage("train", train_inputs, TRAIN, uninterrupted_store)
    assert "resumed_from_step" not in uninterrupted.metrics

    store, _ = copy_of("killed")
    artifacts_before = store.list()
    with killed_after(5), pytest.raises(Killed):
        run_stage("train", train_inputs, TRAIN, store)
    assert store.list() == artifacts_before  # nothing published, and checkpoints are not artifacts
    checkpoints = StoreCheckpointer(store, uninterrupted.ref.id, "train", preference.SPEC.version)
    assert checkpoints.steps() == [4]  # keyed by the output id; step 2's checkpoint was removed

    resumed = run_stage("train", train_inputs, TRAIN, store)
    assert resumed.output == uninterrupted.output and not resumed.cached
    assert resumed.metrics["resumed_from_step"] == 4
    # Weights, tokenizer and the per-step log: bit-for-bit the uninterrupted run's.
    assert artifact_checksums(store, resumed.ref) == artifact_checksums(uninterrupted_store, uninterrupted.ref)
    assert checkpoints.steps() == [] and not store.fs.exists(f"{store.base}/checkpoints/{resumed.ref.id}")


def test_a_damaged_checkpoint_is_refused_not_resumed(copy_of) -> None:
    store, train_inputs = copy_of()
    with killed_after(3), pytest.raises(Killed):
        run_stage("train", train_inputs, TRAIN, store)
    (step_dir,) = (Path(store.base) / "checkpoints").glob("*/step-0000002")
    path = step_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TamperedArtifactError, match="checkpoint .* is damaged"):
        run_stage("train", train_inputs, TRAIN, store)


def test_reference_logps_are_computed_once_and_reused(copy_of) -> None:
    store, train_inputs = copy_of()
    reference_inputs = {"preferences": train_inputs["preferences"], "reference": train_inputs["reference"]}
    logps = run_stage("reference", reference_inputs, {}, store, name="run/round-1/reference-logps")
    table = store.read_table(logps.ref)
    assert table.num_rows == 16 and set(table.column("pair_id").to_pylist()) == {f"pair-1-{i}" for i in range(16)}
    assert all(v < 0 for v in table.column("chosen_logp").to_pylist() + table.column("rejected_logp").to_pylist())
    assert run_stage("reference", reference_inputs, {}, store).cached  # a rerun is a lookup

    config = {"training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3}}
    cached = run_stage("train", train_inputs | {"reference_logps": logps.output}, config, store)
    assert cached.metrics["reference_logps_from_artifact"] == 16
    inline = run_stage("train", train_inputs, config, store)
    assert inline.metrics["reference_logps_from_artifact"] == 0
    # Same numbers whether read from the artifact or computed in the stage: same weights.
    assert store.read_manifest(cached.ref).files == store.read_manifest(inline.ref).files
    assert store.read_manifest(cached.ref).inputs["reference_logps"] == str(logps.ref)  # lineage


def test_reference_logps_made_with_another_max_length_are_refused(copy_of) -> None:
    store, train_inputs = copy_of()
    logps = run_stage("reference", {"preferences": train_inputs["preferences"], "reference": train_inputs["reference"]},
                          {"max_length": 24}, store)
    before = set(store.list())
    with pytest.raises(ValueError, match="another max_length"):
        run_stage("train", train_inputs | {"reference_logps": logps.output}, TRAIN, store)
    assert set(store.list()) == before


def test_mixture_reference_needs_the_reference_logps(copy_of) -> None:
    store, train_inputs = copy_of()
    with pytest.raises(ValueError, match="'reference_logps' input"):
        run_stage("train", train_inputs, TRAIN | {"reference_policy": "mixture"}, store)


def _nothing_written(store: ArtifactStore, before: set) -> bool:
    tmp = store.base + "/tmp"
    return set(store.list()) == before and (not store.fs.exists(tmp) or not store.fs.ls(tmp))


def test_preferences_with_the_wrong_schema_are_refused(copy_of) -> None:
    store, train_inputs = copy_of()
    broken = arithmetic_pairs(4).drop_columns(["chosen"])
    with store.writer("preferences", "hand-broken") as writer:
        writer.write_table(broken, "data", PREFERENCES.schema_id, PREFERENCES.version)
        writer.commit(stage="hand", stage_version="1")
    before = set(store.list())
    with pytest.raises(Exception, match="chosen") as error:
        run_stage("train", train_inputs | {"preferences": "preferences/hand-broken"}, TRAIN, store)
    assert "preferences/hand-broken" in str(error.value)
    assert _nothing_written(store, before)


def test_empty_preferences_are_refused(copy_of) -> None:
    store, train_inputs = copy_of()
    empty = put_pairs(store, PREFERENCES.schema.empty_table(), "empty")
    before = set(store.list())
    with pytest.raises(ValueError, match="nothing to train on"):
        run_stage("train", train_inputs | {"preferences": empty.output}, TRAIN, store)
    with pytest.raises(ValueError, match="no pairs to score"):
        run_stage("reference", {"preferences": empty.output, "reference": train_inputs["reference"]}, {}, store)
    assert _nothing_written(store, before)


def test_a_model_whose_files_do_not_match_its_manifest_is_refused(copy_of) -> None:
    store, train_inputs = copy_of()
    weights = f"{store.base}/artifacts/{train_inputs['policy']}/files/model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    before = set(store.list())
    with pytest.raises(TamperedArtifactError, match="model.safetensors.*changed after it was written"):
        run_stage("train", train_inputs, TRAIN, store)
    assert _nothing_written(store, before)


def test_an_unknown_loss_is_refused_before_anything_runs(copy_of) -> None:
    store, train_inputs = copy_of()
    before = set(store.list())
    with pytest.raises(StageInputError, match="unknown loss 'nope'.*sigmoid"):
        run_stage("train", train_inputs, {"training": {"loss": "nope"}}, store)
    assert _nothing_written(store, before)


def test_a_killed_sft_run_resumes_too(copy_of) -> None:
    """The SFT stage runs the same loop with the same store checkpoints."""
    config = {"model": TINY_MODEL, "training": {"max_steps": 6, "batch_size": 8, "checkpoint_every": 2}}
    whole_store, _ = copy_of("whole")
    (prompts_ref,) = whole_store.list("prompts")
    whole = run_stage("sft", {"prompts": str(prompts_ref)}, config, whole_store)
    store, _ = copy_of("killed")
    with killed_after(3), pytest.raises(Killed):
        run_stage("sft", {"prompts": str(prompts_ref)}, config, store)
    resumed = run_stage("sft", {"prompts": str(prompts_ref)}, config, store)
    assert resumed.output == whole.output and resumed.metrics["resumed_from_step"] == 2
    assert artifact_checksums(store, resumed.ref) == artifact_checksums(whole_store, whole.ref)
    assert StoreCheckpointer(store, resumed.ref.id, "sft", sft.SPEC.version).steps() == []
