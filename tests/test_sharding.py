"""Data-parallel stages (prefloop.sharding): 1 and 3 shards publish byte-identical artifacts with the same
id for sample, evaluate, label (reward model), label-rm, label-judge and mcts on the smoke model; threads,
processes, Ray and prefect-ray engines (the last: every run of blocks a Prefect task run, recorded by the
API); the block queue; what a worker process imports and its thread count; bad sharding configs fail with
a clear error."""

from __future__ import annotations

import asyncio
import builtins
import importlib.util
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import types
from collections.abc import Callable

import pyarrow as pa
import pytest
from helpers import arithmetic_pairs

from prefloop.datasets_spec import PREFERENCES
from prefloop.errors import UserError
from prefloop.sharding import (
    PREFECT_RAY_INSTALL,
    RAY_INSTALL,
    BlockQueue,
    ShardingConfig,
    block_seed,
    blocks,
    run_sharded,
)
from prefloop.stage import (
    StageConfig,
    StageContext,
    StageInputError,
    StageOutput,
    StageSpec,
    execute,
    output_ref,
    parse_config,
)
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import run_stage, stage_entry

# configs/smoke.yaml's model and task sizes.
SMOKE_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 64}
SMOKE_TASK = {"min_ops": 1, "max_ops": 2}
THREE_THREADS = {"shards": 3, "engine": "threads"}


class _Content(StageConfig):
    name: str


def _put_pairs(store: ArtifactStore, count: int, short: bool = False) -> str:
    """Pairs on embedded problems; ``short``: a one-step prompt and bare answers (they fit a judge prompt)."""
    table = arithmetic_pairs(count)
    if short:
        table = pa.table({"pair_id": table.column("pair_id"), "prompt_id": table.column("prompt_id"),
                          "prompt": [f"{i}+1=?" for i in range(count)], "chosen": [f"A:{i + 1}" for i in range(count)],
                          "rejected": [f"A:{i}" for i in range(count)], "margin": table.column("margin")})
    spec = StageSpec("hand-preferences", "1", _Content, "preferences", {}, PREFERENCES)
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {"name": f"pairs-{short}"}, store).output


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A store with the smoke loop's inputs: prompts, an SFT policy, samples, pairs and a reward model."""
    store = ArtifactStore(tmp_path_factory.mktemp("sharding") / "store")
    sft_prompts = run_stage("prompts", {}, {"n_train": 32, "n_heldout": 0, "task": SMOKE_TASK}, store)
    prompts = run_stage("prompts", {}, {"n_train": 10, "n_heldout": 10, "task": SMOKE_TASK}, store)
    policy = run_stage("sft", {"prompts": sft_prompts.output},
                       {"model": SMOKE_MODEL, "training": {"max_steps": 30, "batch_size": 16, "learning_rate": 0.003}},
                       store)
    reference = run_stage("sft", {"prompts": sft_prompts.output},
                          {"model": SMOKE_MODEL, "training": {"max_steps": 5, "batch_size": 16}}, store)
    samples = run_stage("sample", {"policy": policy.output, "prompts": prompts.output},
                        {"max_prompts": 10, "n": 3, "max_new_tokens": 12, "batch_size": 6}, store)
    pairs = _put_pairs(store, 10)
    short_pairs = _put_pairs(store, 10, short=True)
    reward_model = run_stage("train-rm", {"preferences": pairs},
                             {"model": SMOKE_MODEL, "training": {"max_steps": 2, "batch_size": 4}}, store)
    return {"store": store, "prompts": prompts.output, "policy": policy.output, "reference": reference.output, "samples": samples.output,
            "pairs": pairs, "short_pairs": short_pairs, "reward_model": reward_model.output}


def _run_fresh(source: dict, tmp_path, name: str, stage: str, inputs: dict, config: dict):
    """Run ``stage`` in a copy of the source store (so an earlier run's artifact is not simply found)."""
    root = tmp_path / name
    shutil.copytree(source["store"].base, root)
    store = ArtifactStore(root)
    result = run_stage(stage, inputs, config, store)
    assert not result.cached
    return store, result


def _table_checksums(store: ArtifactStore, ref) -> dict[str, list[str]]:
    """sha256 of every Parquet part of every table of an artifact (data, drops, extra tables)."""
    manifest = store.read_manifest(ref)
    return {name: [part.sha256 for part in table.files] for name, table in manifest.tables.items()}


def _same_artifact_with_1_and_3_shards(source, tmp_path, stage: str, inputs: dict, config: dict,
                                       sharding: dict | None = None) -> tuple:
    one_store, one = _run_fresh(source, tmp_path, "one", stage, inputs, config)
    three_store, three = _run_fresh(source, tmp_path, "three", stage, inputs,
                                    {**config, "sharding": sharding or THREE_THREADS})
    assert three.output == one.output
    assert _table_checksums(three_store, three.ref) == _table_checksums(one_store, one.ref)
    assert one.metrics["shards"] == 1 and three.metrics["shards"] == 3
    assert "sharding" not in three_store.read_manifest(three.ref).config
    return one_store, one


# ---------------------------------------------------------------------------------------------
# 1 vs 3 shards, threads engine
# ---------------------------------------------------------------------------------------------
def test_sample_gives_the_same_artifact_with_1_and_3_shards(source, tmp_path) -> None:
    store, result = _same_artifact_with_1_and_3_shards(
        source, tmp_path, "sample", {"policy": source["policy"], "prompts": source["prompts"]},
        {"max_prompts": 10, "n": 2, "max_new_tokens": 12, "batch_size": 4})
    assert store.read_table(result.ref).num_rows == 20


def test_evaluate_gives_the_same_artifact_with_1_and_3_shards(source, tmp_path) -> None:
    """Greedy accuracy, pass@k samples, the KL to a reference and the rewards, merged from shards."""
    store, result = _same_artifact_with_1_and_3_shards(
        source, tmp_path, "evaluate",
        {"policy": source["policy"], "prompts": source["prompts"], "reference": source["reference"],
         "reward_model": source["reward_model"]},
        {"max_prompts": 10, "max_new_tokens": 12, "batch_size": 4, "samples_per_prompt": 2, "pass_k": [1, 2],
         "sampled_prompts": 7})
    assert {"pass@2", "kl_to_reference", "mean_reward"} <= set(result.metrics)
    assert result.metrics["kl_to_reference"] != 0.0  # the reference is another model: its scores were computed


def test_label_with_a_reward_model_gives_the_same_artifact_with_1_and_3_shards(source, tmp_path) -> None:
    store, result = _same_artifact_with_1_and_3_shards(
        source, tmp_path, "label", {"samples": source["samples"], "model": source["reward_model"]},
        {"labeler": "reward_model", "settings": {"batch_size": 4}})
    assert store.read_table(result.ref).num_rows == 30


SEARCH = {"max_prompts": 6, "children_per_node": 2, "simulations": 2, "lookahead_depth": 2, "max_depth": 4,
          "max_step_tokens": 8, "self_eval_template": "{prompt}{steps}?", "self_eval_yes": "A", "self_eval_no": "?",
          "trees_per_batch": 2}


def test_mcts_gives_the_same_trees_with_1_and_3_shards(source, tmp_path) -> None:
    store, result = _same_artifact_with_1_and_3_shards(
        source, tmp_path, "mcts", {"policy": source["policy"], "prompts": source["prompts"]}, SEARCH)
    assert result.metrics["trees"] == 6


def test_mcts_refuses_shards_when_all_trees_form_one_batch(source, tmp_path) -> None:
    with pytest.raises(UserError, match="trees_per_batch is None"):
        run_stage("mcts", {"policy": source["policy"], "prompts": source["prompts"]},
                  {**SEARCH, "trees_per_batch": None, "sharding": THREE_THREADS}, source["store"])


@pytest.mark.parametrize("target", ["samples", "preferences"])
def test_label_rm_gives_the_same_artifact_with_1_and_3_shards(source, tmp_path, target) -> None:
    inputs = {"reward_model": source["reward_model"], target: source["samples" if target == "samples" else "pairs"]}
    store, result = _same_artifact_with_1_and_3_shards(source, tmp_path, "label-rm", inputs, {"batch_size": 3})
    assert store.read_table(result.ref).num_rows == (30 if target == "samples" else 10)


def test_label_judge_gives_the_same_artifact_with_1_and_3_shards(source, tmp_path) -> None:
    store, result = _same_artifact_with_1_and_3_shards(
        source, tmp_path, "label-judge", {"preferences": source["short_pairs"], "judge": source["policy"]},
        {"batch_size": 3, "template": "{prompt}{answer_a}|{answer_b}|", "option_a": "1", "option_b": "2"})
    assert store.read_table(result.ref).num_rows == 30  # the combined label and one per order, for 10 pairs


# ---------------------------------------------------------------------------------------------
# Other engines: worker processes and Ray tasks reopen the store from its URI
# ---------------------------------------------------------------------------------------------
SAMPLE_CONFIG = {"max_prompts": 10, "n": 2, "max_new_tokens": 12, "batch_size": 4}


@pytest.mark.slow  # three spawned interpreters each import torch and transformers (~30 s on 2 busy cores)
def test_sample_in_worker_processes_gives_the_same_artifact(source, tmp_path) -> None:
    _same_artifact_with_1_and_3_shards(source, tmp_path, "sample",
                                       {"policy": source["policy"], "prompts": source["prompts"]}, SAMPLE_CONFIG,
                                       sharding={"shards": 3, "engine": "processes", "local_shard": False})


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason=f"Ray is not installed ({RAY_INSTALL}): the ray engine is not tested")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_sample_on_ray_gives_the_same_artifact(source, tmp_path, ray_instance) -> None:
    """Ray actors rebuild the stage context from the store's URI and read the policy from the store (every
    block on Ray: without local_shard: false this process would compute the blocks while the actors start)."""
    _same_artifact_with_1_and_3_shards(source, tmp_path, "sample",
                                       {"policy": source["policy"], "prompts": source["prompts"]}, SAMPLE_CONFIG,
                                       sharding={"shards": 3, "engine": "ray", "local_shard": False})


@pytest.fixture(scope="module")
def prefect_api():
    """A Prefect API for this module's task runs (Prefect's test harness: a server on a temporary database)."""
    pytest.importorskip("prefect_ray", reason=f"prefect-ray is not installed ({PREFECT_RAY_INSTALL}): the "
                        "prefect-ray engine is not tested")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _blocks_named(runs: list) -> list[int]:
    """The blocks the task runs computed, from their names (``sample-shard-blocks-4-7``: blocks 4 to 7)."""
    spans = sorted(tuple(map(int, run.name.rsplit("-", 2)[1:])) for run in runs)
    return [block for first, last in spans for block in range(first, last + 1)]


def _shard_task_runs(stage: str, flow_run, done: Callable[[list], bool], timeout_s: float = 30.0) -> list:
    """``stage``'s shard task runs (not its warm-ups) of ``flow_run`` (None: outside flows) as the API records
    them, once ``done(runs)`` and all are final: a Ray worker reports states as events, which the server
    records in the background."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def read() -> list:
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{stage}-shard-blocks-")), limit=200)
        return [run for run in runs if run.name.startswith(f"{stage}-shard-blocks-") and run.flow_run_id == flow_run]

    deadline = time.monotonic() + timeout_s
    while True:
        runs = asyncio.run(read())
        if (done(runs) and all(run.state and run.state.is_final() for run in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _covering(block_count: int) -> Callable[[list], bool]:
    return lambda runs: _blocks_named(runs) == list(range(block_count))


class _ShardLog(logging.Handler):
    """Keeps the sharding log's lines (on its own logger: Prefect's logging setup may stop propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def runs_the_lanes_took(self) -> int:
        """The runs of blocks every lane computed, from the per-lane summaries."""
        return sum(int(match.group(1)) for line in self.lines if (match := re.search(r"blocks in (\d+) runs", line)))


def test_sample_on_prefect_ray_gives_the_same_artifact_as_task_runs(source, tmp_path, ray_instance,
                                                                     prefect_api) -> None:
    """Every run of blocks is a Prefect task run on Ray (local_shard: false: no block in this process), each
    recorded COMPLETED under its blocks' name; together they cover the 5 blocks once, in runs the lanes took."""
    sharding_log, lines = logging.getLogger("prefloop.sharding"), _ShardLog()
    level = sharding_log.level
    sharding_log.setLevel(logging.DEBUG)
    sharding_log.addHandler(lines)
    try:
        _same_artifact_with_1_and_3_shards(source, tmp_path, "sample",
                                           {"policy": source["policy"], "prompts": source["prompts"]}, SAMPLE_CONFIG,
                                           sharding={"shards": 3, "engine": "prefect-ray", "local_shard": False})
    finally:
        sharding_log.removeHandler(lines)
        sharding_log.setLevel(level)
    blocks_sampled = len(blocks(SAMPLE_CONFIG["max_prompts"], SAMPLE_CONFIG["batch_size"] // SAMPLE_CONFIG["n"]))
    runs = _shard_task_runs("sample", None, _covering(blocks_sampled))
    assert _blocks_named(runs) == list(range(blocks_sampled))  # each block in one task run
    assert len(runs) == lines.runs_the_lanes_took() >= 2
    assert {run.state.type.value for run in runs} == {"COMPLETED"}


def _sharded_in_a_flow(ctx: StageContext, sharding: ShardingConfig, parts: list, work, ray) -> tuple:
    """``run_sharded`` in a Prefect task of a flow; returns the flow's final state, its flow run id and, when it
    completed, (results, shards, the stage task run's id). ``work`` lives in this test module, which Ray workers
    cannot import (tests/ is not on their path): it travels by value."""
    from prefect import flow, task
    from prefect.context import TaskRunContext

    @task(name="sharded-stage")
    def stage_task() -> tuple:
        results, shards = run_sharded(ctx, sharding, parts, work)
        return results, shards, TaskRunContext.get().task_run.id

    @flow(name="sharded-flow")
    def sharded_flow() -> tuple:
        return stage_task()

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        state = sharded_flow(return_state=True)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return state, state.state_details.flow_run_id, state.result(raise_on_failure=False)


def _sample_context(source) -> StageContext:
    spec = stage_entry("sample").load().SPEC
    return StageContext(spec=spec, config=parse_config(spec, {}), inputs={}, store=source["store"], output_id="x")


def test_shard_task_runs_belong_to_the_stages_flow_run_and_task_run(source, ray_instance, prefect_api) -> None:
    """The lanes submit from helper threads: each task run still carries the submitting stage's flow run and
    task run (the caller's Prefect context), and its work runs in a Ray worker with threads_per_shard."""
    sharding = ShardingConfig(shards=3, engine="prefect-ray", local_shard=False)
    state, flow_run, (results, shards, stage_run) = _sharded_in_a_flow(_sample_context(source), sharding,
                                                                        list(range(8)), report_worker, ray_instance)
    assert state.is_completed() and shards == 3 and [result["part"] for result in results] == list(range(8))
    assert all(result["pid"] != os.getpid() for result in results)
    assert {result["omp_threads"] for result in results} == {"1"}

    runs = _shard_task_runs("sample", flow_run, _covering(8))
    assert _blocks_named(runs) == list(range(8)) and {run.state.type.value for run in runs} == {"COMPLETED"}
    assert all({parent.id for parent in run.task_inputs["__parents__"]} == {stage_run} for run in runs)


_FAILED: dict[str, bool] = {}


def fails_first_call(ctx: StageContext, parts: list[int], advance) -> list[dict]:
    """Shard work whose first call with parts fails. Shipped by value, each task run unpickles its own copy
    (and ``_FAILED`` with it); a Prefect retry calls the same copy again."""
    if parts and not _FAILED.get("once"):
        _FAILED["once"] = True
        raise RuntimeError("lost the block's model file")
    return [{"part": part} for part in parts]


def test_a_failed_run_of_blocks_is_a_failed_task_run_and_prefect_retries_it(source, ray_instance, prefect_api) -> None:
    """Without retries the stage fails with the shard's error and its task run is Failed; with
    ``sharding.retries: 1`` Prefect reruns each failed run of blocks, and the stage completes."""
    ctx = _sample_context(source)
    failing, flow_run, error = _sharded_in_a_flow(
        ctx, ShardingConfig(shards=2, engine="prefect-ray", local_shard=False), list(range(4)), fails_first_call,
        ray_instance)
    assert failing.is_failed() and isinstance(error, RuntimeError) and "lost the block's model file" in str(error)
    failed = _shard_task_runs("sample", flow_run, lambda runs: any(run.state.is_failed() for run in runs if run.state))
    assert "FAILED" in {run.state.type.value for run in failed}

    retried, flow_run, (results, shards, _) = _sharded_in_a_flow(
        ctx, ShardingConfig(shards=2, engine="prefect-ray", local_shard=False, retries=1), list(range(4)),
        fails_first_call, ray_instance)
    assert retried.is_completed() and [result["part"] for result in results] == list(range(4))
    runs = _shard_task_runs("sample", flow_run, _covering(4))
    assert {run.state.type.value for run in runs} == {"COMPLETED"} and {run.run_count for run in runs} == {2}


def test_prefect_ray_on_a_cluster_needs_an_api_the_cluster_reaches(source, prefect_api) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sharding = ShardingConfig(shards=2, engine="prefect-ray", address="ray://ray-head.invalid:10001")
    with temporary_settings(restore_defaults={PREFECT_API_URL}), \
            pytest.raises(UserError, match="needs a Prefect API the cluster's workers can reach.*set PREFECT_API_URL"):
        run_sharded(_sample_context(source), sharding, list(range(4)), report_worker)


# ---------------------------------------------------------------------------------------------
# The plan, the id and bad configs
# ---------------------------------------------------------------------------------------------
def _all_runs(queue: BlockQueue) -> list[range]:
    return list(iter(queue.take, None))


def test_the_block_queue_hands_out_contiguous_shrinking_runs_that_cover_everything() -> None:
    assert blocks(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    runs = _all_runs(BlockQueue([1] * 64, 2))
    assert runs[0].start == 0 and runs[-1].stop == 64
    assert all(earlier.stop == later.start for earlier, later in itertools.pairwise(runs))  # contiguous, no gap
    lengths = [len(run) for run in runs]
    # guided self-scheduling: a quarter of what is left (2 shards), down to single blocks at the end
    assert lengths[:4] == [16, 12, 9, 6] and lengths == sorted(lengths, reverse=True) and lengths[-3:] == [1, 1, 1]
    assert _all_runs(BlockQueue([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2))[:2] == [range(0, 1), range(1, 3)]  # by weight
    assert _all_runs(BlockQueue([0, 0, 0], 3)) == [range(0, 1), range(1, 2), range(2, 3)]  # no weights: count
    assert _all_runs(BlockQueue([], 3)) == []
    stopped = BlockQueue([1] * 8, 2)
    assert stopped.take() == range(0, 2)
    stopped.stop()
    assert stopped.take() is None  # a failed shard stops the others taking more
    assert block_seed(0, "p1") == block_seed(0, "p1") != block_seed(0, "p2") != block_seed(1, "p1")


HEAVY_MODULES = ("prefect", "great_expectations", "pandas", "datasets", "prefloop.cli")


def report_worker(ctx: StageContext, parts: list[int], advance) -> list[dict]:
    """Shard work that reports, per part, the process it ran in, its thread setting and heavy imports."""
    return [{"part": part, "pid": os.getpid(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
             "heavy": sorted(name for name in HEAVY_MODULES if name in sys.modules),
             "torch_loaded": "torch" in sys.modules} for part in parts]


def test_worker_processes_import_no_prefect_even_under_prefects_engine(source, monkeypatch) -> None:
    """A flow run's main module is ``prefect.engine``; spawned workers must not re-import it (nor the CLI):
    they start without the parent's ``__main__``, with ``threads_per_shard`` torch threads."""
    engine_main = types.ModuleType("__main__")
    engine_main.__spec__ = importlib.util.find_spec("prefect.engine")  # what `python -m prefect.engine` leaves
    monkeypatch.setitem(sys.modules, "__main__", engine_main)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = stage_entry("sample").load().SPEC
    ctx = StageContext(spec=spec, config=parse_config(spec, {}), inputs={}, store=source["store"], output_id="x")
    sharding = ShardingConfig(shards=2, engine="processes", threads_per_shard=2, local_shard=False)
    results, shards = run_sharded(ctx, sharding, list(range(6)), report_worker)
    assert shards == 2 and [result["part"] for result in results] == list(range(6))
    assert all(result["pid"] != os.getpid() for result in results)  # local_shard: false, every block in a worker
    assert [result["heavy"] for result in results] == [[]] * 6
    assert {result["omp_threads"] for result in results} == {"2"}
    assert sys.modules["__main__"] is engine_main  # the parent's main is back
    if "forkserver" in multiprocessing.get_all_start_methods():
        # forked from the fork server, which imported torch once: work that never touches torch finds it loaded
        assert {result["torch_loaded"] for result in results} == {True}


def test_the_local_shard_computes_in_the_stages_process(source) -> None:
    """threads: every shard in this process; the blocks come back in order whichever shard ran them."""
    spec = stage_entry("sample").load().SPEC
    ctx = StageContext(spec=spec, config=parse_config(spec, {}), inputs={}, store=source["store"], output_id="x")
    results, shards = run_sharded(ctx, ShardingConfig(shards=3, engine="threads"), list(range(40)), report_worker)
    assert shards == 3 and [result["part"] for result in results] == list(range(40))
    assert {result["pid"] for result in results} == {os.getpid()}
    assert ShardingConfig(engine="processes").runs_local_shard()
    assert ShardingConfig(engine="ray").runs_local_shard()
    assert not ShardingConfig(engine="ray", address="auto").runs_local_shard()  # a cluster: not the driver
    assert ShardingConfig(engine="prefect-ray").runs_local_shard()
    assert not ShardingConfig(engine="prefect-ray", address="ray://head:10001").runs_local_shard()


@pytest.mark.parametrize("stage", ["sample", "evaluate", "label", "label-rm", "label-judge", "label-policy", "mcts"])
def test_the_id_and_the_manifest_config_do_not_depend_on_sharding(source, stage) -> None:
    spec = stage_entry(stage).load().SPEC
    inputs = {role: source["policy"] if kind == "model" else source["prompts"] for role, kind in spec.inputs.items()
              if role not in spec.optional_inputs and kind in ("model", "prompts")}
    one = parse_config(spec, {})
    three = parse_config(spec, {"sharding": {"shards": 3, "engine": "ray", "address": "auto"}})
    assert output_ref(spec, _refs(source, inputs), one) == output_ref(spec, _refs(source, inputs), three)
    assert three.content() == one.content() and "sharding" not in three.content()


def _refs(source, inputs):
    return {role: source["store"].resolve(ref) for role, ref in inputs.items()}


def test_bad_sharding_configs_fail_with_a_clear_error(source) -> None:
    spec = stage_entry("sample").load().SPEC
    with pytest.raises(StageInputError, match="shards is 0: it counts the parallel shards"):
        parse_config(spec, {"sharding": {"shards": 0}})
    with pytest.raises(StageInputError, match=r"engine 'dask' is not an engine .* threads, processes, ray, "
                       r"prefect-ray \(ray needs .*, prefect-ray pip install 'prefloop\[prefect-ray\]'\)"):
        parse_config(spec, {"sharding": {"shards": 2, "engine": "dask"}})
    with pytest.raises(StageInputError, match="address names a Ray cluster; set engine: ray or prefect-ray"):
        parse_config(spec, {"sharding": {"shards": 2, "engine": "threads", "address": "auto"}})
    with pytest.raises(StageInputError, match="local_shard is false but the engine is 'threads'"):
        parse_config(spec, {"sharding": {"shards": 2, "engine": "threads", "local_shard": False}})
    with pytest.raises(StageInputError, match="retries is 2 but the engine is 'ray': retries are Prefect's"):
        parse_config(spec, {"sharding": {"shards": 2, "engine": "ray", "retries": 2}})
    assert ShardingConfig().shards == 1  # the default: one shard, in the stage's own process


def test_the_ray_engine_without_ray_says_how_to_install_it(source, tmp_path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(__import__("sys").modules, "ray", raising=False)
    with pytest.raises(UserError, match=r"Ray is not installed .*pip install 'prefloop\[ray\]'"):
        run_stage("sample", {"policy": source["policy"], "prompts": source["prompts"]},
                  {**SAMPLE_CONFIG, "seed": 5, "sharding": {"shards": 2, "engine": "ray"}}, source["store"])


def test_the_prefect_ray_engine_without_prefect_ray_says_how_to_install_it(source, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_prefect_ray(name, *args, **kwargs):
        if name == "prefect_ray" or name.startswith("prefect_ray."):
            raise ImportError("No module named 'prefect_ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prefect_ray)
    for name in [name for name in sys.modules if name == "prefect_ray" or name.startswith("prefect_ray.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(UserError, match=r"prefect-ray is not installed .*pip install 'prefloop\[prefect-ray\]'"):
        run_stage("sample", {"policy": source["policy"], "prompts": source["prompts"]},
                  {**SAMPLE_CONFIG, "seed": 6, "sharding": {"shards": 2, "engine": "prefect-ray"}}, source["store"])
