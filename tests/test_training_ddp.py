"""Data-parallel training (issue 18, item 3): 2 gloo processes on CPU against one process.

Unmarked (fast tier, ~20 s): the ids, the shards, bad configs, the read-only checkpointer, and a
real 2-rank launch whose rank 1 fails. ``-m slow`` (each spawns ranks that import torch and
accelerate, then trains: 30-130 s apiece on a busy 2-core machine): DPO, SFT and reward model 2 vs
1 process, a killed 2-process run resuming, a rank killed by SIGKILL.

Tolerance: a 2-process step sums two shard gradients (each over half the rows) with an all-reduce,
where one process sums all rows in one pass; float32 addition is not associative, so the gradients
differ by a few ulps (~1e-7 relative) and AdamW's g/√v carries that into the weights. Over the few
steps here the weights agree to WEIGHT_TOLERANCE (absolute; the weights are O(0.1), so ~1e-4 of a
typical weight), far below one step's change (learning rate 1e-3 ⇒ ~1e-3 per step).
"""

import os
import shutil

import pytest
import torch
from ddp_recipes import dying_recipe, failing_recipe
from helpers import arithmetic_pairs
from safetensors.torch import load_file
from test_train_resume import TINY_MODEL, Killed, killed_after, put_pairs

from prefloop.stage import StageInputError
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training.artifacts import StoreCheckpointer
from prefloop.tasks.training.distributed import DataParallel, DistributedTrainingError, RecipeRun, launch

WEIGHT_TOLERANCE = 1e-4
STEPS = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2}
TWO = {"distributed": {"processes": 2, "backend": "gloo", "timeout_s": 60}}


def weights(store: ArtifactStore, ref) -> dict[str, torch.Tensor]:
    ref = ref if isinstance(ref, ArtifactRef) else ArtifactRef.parse(ref)
    return load_file(store.local_files(ref) / "model.safetensors")


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max_difference(before, after)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A store with prompts, a tiny SFT policy and 16 pairs (built once, copied per test)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ddp-inputs") / "store"
    store = ArtifactStore(root)
    prompts = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 0, "task": {"min_ops": 1, "max_ops": 1}}, store)
    model = run_stage("sft", {"prompts": prompts.output},
                      {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}}, store)
    pairs = put_pairs(store, arithmetic_pairs(16))
    return root, {"prompts": prompts.output, "preferences": pairs.output, "policy": model.output,
                  "reference": model.output}


@pytest.fixture
def copy_of(inputs, tmp_path):
    root, refs = inputs

    def make(name: str) -> tuple[ArtifactStore, dict[str, str]]:
        shutil.copytree(root, tmp_path / name)
        return ArtifactStore(tmp_path / name), dict(refs)

    return make


def files_under(path) -> set[str]:
    return {os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names}


@pytest.mark.slow
def test_two_processes_train_dpo_to_the_one_process_weights_with_the_same_id(copy_of) -> None:
    store, refs = copy_of("dpo")
    train_inputs = {role: refs[role] for role in ("preferences", "policy", "reference")}
    one = run_stage("train", train_inputs, {"training": STEPS}, store)
    two_store, _ = copy_of("dpo-two")
    two = run_stage("train", train_inputs, {"training": STEPS | TWO}, two_store)

    assert two.output == one.output  # the process count is a run option, not part of the id
    assert two_store.read_manifest(two.ref).config == store.read_manifest(one.ref).config
    assert two.metrics["distributed_processes"] == 2 and one.metrics["distributed_processes"] == 1
    start = weights(store, refs["policy"])
    trained_one, trained_two = weights(store, one.ref), weights(two_store, two.ref)
    assert max_change(start, trained_one) > 10 * WEIGHT_TOLERANCE  # training moved the weights
    print(f"dpo: max |w_1 - w_2| = {max_difference(trained_one, trained_two):.2e}")
    assert max_difference(trained_one, trained_two) < WEIGHT_TOLERANCE
    assert two.metrics["final_loss"] == pytest.approx(one.metrics["final_loss"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_train_sft_to_the_one_process_weights(copy_of) -> None:
    store, refs = copy_of("sft")
    config = {"model": TINY_MODEL, "seed": 3, "training": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3}}
    one = run_stage("sft", {"prompts": refs["prompts"]}, config, store)
    two_store, _ = copy_of("sft-two")
    two = run_stage("sft", {"prompts": refs["prompts"]}, config | {"training": config["training"] | TWO}, two_store)
    assert two.output == one.output
    assert max_difference(weights(store, one.ref), weights(two_store, two.ref)) < WEIGHT_TOLERANCE
    # The token count is a sum over the shards, the loss a mean: both equal the one-process log's.
    one_log, two_log = store.read_table(one.ref, "train_log"), two_store.read_table(two.ref, "train_log")
    tokens = [row for row in one_log.to_pylist() if row["metric"] == "tokens"]
    assert tokens == [row for row in two_log.to_pylist() if row["metric"] == "tokens"]


@pytest.mark.slow
def test_two_processes_train_a_reward_model_to_the_one_process_weights(copy_of) -> None:
    store, refs = copy_of("rm")
    config = {"model": TINY_MODEL, "heldout_fraction": 0.25,
              "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3}}
    one = run_stage("train-rm", {"preferences": refs["preferences"]}, config, store)
    two_store, _ = copy_of("rm-two")
    two = run_stage("train-rm", {"preferences": refs["preferences"]},
                    config | {"training": config["training"] | TWO}, two_store)
    assert two.output == one.output
    assert max_difference(weights(store, one.ref), weights(two_store, two.ref)) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_and_only_rank_0_writes(copy_of, monkeypatch) -> None:
    """The launcher stops after step 3 (its ranks are killed with it); a rerun resumes from rank 0's
    step-2 checkpoint and ends with the weights of an unkilled run. Rank 1 writes nothing: its
    checkpointer is read-only and it publishes no artifact."""
    store, refs = copy_of("killed")
    train_inputs = {role: refs[role] for role in ("preferences", "policy", "reference")}
    config = {"training": STEPS | TWO}
    whole_store, _ = copy_of("whole")
    whole = run_stage("train", train_inputs, config, whole_store)

    before = set(store.list())
    with killed_after(3), pytest.raises(Killed):
        run_stage("train", train_inputs, config, store)
    assert set(store.list()) == before
    assert StoreCheckpointer(store, whole.ref.id, "train", "").steps() == [2]

    resumed = run_stage("train", train_inputs, config, store)
    assert resumed.output == whole.output and resumed.metrics["resumed_from_step"] == 2
    assert max_difference(weights(store, resumed.ref), weights(whole_store, whole.ref)) < WEIGHT_TOLERANCE
    assert not store.fs.exists(f"{store.base}/checkpoints/{resumed.ref.id}")


def test_a_read_only_checkpointer_reads_but_never_writes(copy_of) -> None:
    store, _ = copy_of("read-only")
    writer = StoreCheckpointer(store, "some-output", "train", "3")
    from prefloop.tasks.training.optim import Checkpoint

    state = Checkpoint(step=2, num_steps=4, model={"w": torch.ones(2)}, optimizer={}, scheduler={}, history=[])
    writer.save(state)
    reader = writer.read_only()
    files = files_under(store.base)
    assert reader.load().step == 2 and reader.resumed_from == 2
    with pytest.raises(RuntimeError, match="only rank 0"):
        reader.save(state)
    assert files_under(store.base) == files  # not even a lock file


def test_shards_cover_every_example_of_a_micro_batch_exactly_once() -> None:
    for size in (4, 5, 7, 8):
        for world in (1, 2, 3):
            if world > size:
                continue
            indices = list(range(100, 100 + size))
            shards = [DataParallel(rank, world).shard(indices) for rank in range(world)]
            assert [i for shard in shards for i in shard] == indices
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_bad_process_counts_are_refused_with_a_reason(copy_of) -> None:
    store, refs = copy_of("bad")
    train_inputs = {role: refs[role] for role in ("preferences", "policy", "reference")}
    with pytest.raises(StageInputError, match="processes is 0: it counts the training processes"):
        run_stage("train", train_inputs, {"training": {"distributed": {"processes": 0}}}, store)
    with pytest.raises(StageInputError, match="processes is 8 but batch_size is 4"):
        run_stage("train", train_inputs, {"training": STEPS | {"distributed": {"processes": 8}}}, store)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="2 nccl processes .* 0 GPU"):
            run_stage("train", train_inputs, {"training": STEPS | {"distributed": {"processes": 2, "backend": "nccl"}}},
                      store)


# ---- a failing or dying rank fails the launch with a clear error, not a hang --------------------
def test_a_rank_that_raises_fails_the_launch_with_its_error() -> None:
    with pytest.raises(ValueError, match="could not read its shard") as error:
        launch(RecipeRun(failing_recipe, torch.nn.Linear(2, 2)), 2, "gloo", timeout_s=60)
    assert any("training rank 1 of 2" in note for note in error.value.__notes__)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_launch_instead_of_hanging() -> None:
    with pytest.raises(DistributedTrainingError, match="training rank 1 of 2 failed"):
        launch(RecipeRun(dying_recipe, torch.nn.Linear(2, 2)), 2, "gloo", timeout_s=60)


@pytest.mark.parametrize("stage", ["train", "sft", "train-rm"])
def test_the_process_count_is_not_part_of_the_output_id_or_the_manifest_config(stage) -> None:
    from prefloop.stage import output_ref, parse_config
    from prefloop.tasks.registry import stage_entry

    spec = stage_entry(stage).spec
    one = parse_config(spec, {"training": {"batch_size": 4}})
    two = parse_config(spec, {"training": {"batch_size": 4} | TWO})
    assert two.training.distributed.processes == 2  # the Python form (what flows pass on) keeps it
    assert two.model_dump()["training"]["distributed"]["processes"] == 2
    assert "distributed" not in two.content()["training"]  # what the id and manifest see
    assert output_ref(spec, {}, one) == output_ref(spec, {}, two)
    other = parse_config(spec, {"training": {"batch_size": 8}})
    assert output_ref(spec, {}, other) != output_ref(spec, {}, one)  # the rest of training still counts
