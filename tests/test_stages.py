"""Each stage's core on tiny inputs, without Prefect."""

import math

import pyarrow as pa
import pytest

from prefloop.datasets_spec import LABELS, SAMPLES
from prefloop.stage import StageInputError, StageOutput, execute
from prefloop.tasks.common.prompts import select_prompts
from prefloop.tasks.common.statistics import paired_gain
from prefloop.tasks.registry import run_stage

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}


def put(store, spec_module, table, name="x"):
    """Write a hand-made table as if a stage had made it (so other stages can read it)."""
    spec = spec_module
    return execute(spec, lambda ctx: StageOutput(table=table), {}, {}, store, name)


def _samples_spec():
    from prefloop.stage import StageConfig, StageSpec

    class Empty(StageConfig):
        pass

    return {
        "samples": StageSpec("hand-samples", "1", Empty, "samples", {}, SAMPLES),
        "labels": StageSpec("hand-labels", "1", Empty, "labels", {}, LABELS),
    }


def samples_table(rows):
    return pa.table({
        "sample_id": [r[0] for r in rows], "prompt_id": [r[1] for r in rows], "prompt": [f"{r[1]}?" for r in rows],
        "completion": [r[2] for r in rows], "finish_reason": ["stop"] * len(rows),
        "round": pa.array([1] * len(rows), pa.int32()), "policy_model_id": ["m"] * len(rows),
    })


def labels_table(scores):
    return pa.table({
        "label_id": [f"l-{s}" for s in scores], "target_id": list(scores), "target_kind": ["sample"] * len(scores),
        "labeler": ["exact_answer"] * len(scores), "score": list(scores.values()),
    })


def test_best_vs_worst_pairs_best_with_worst_and_ties_make_no_pair(store):
    specs = _samples_spec()
    samples = put(store, specs["samples"], samples_table([
        ("a1", "qa", "A:1"), ("a2", "qa", "A:2"), ("a3", "qa", "A:3"),  # scores 1, 0.5, 0
        ("b1", "qb", "A:5"), ("b2", "qb", "A:6"),                        # tie: no pair
    ]))
    labels = put(store, specs["labels"], labels_table({"a1": 1.0, "a2": 0.5, "a3": 0.0, "b1": 1.0, "b2": 1.0}))
    result = run_stage("construct", {"samples": samples.output, "labels": labels.output}, {}, store)
    pairs = store.read_table(result.ref).to_pylist()
    assert len(pairs) == 1
    assert (pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["margin"]) == ("A:1", "A:3", 1.0)
    assert pairs[0]["chosen_sample_id"] == "a1" and pairs[0]["rejected_sample_id"] == "a3"
    assert result.metrics["prompts_all_tied"] == 1


def test_rerun_with_same_inputs_is_a_lookup(store):
    specs = _samples_spec()
    samples = put(store, specs["samples"], samples_table([("a1", "qa", "A:1"), ("a2", "qa", "A:2")]))
    labels = put(store, specs["labels"], labels_table({"a1": 1.0, "a2": 0.0}))
    first = run_stage("construct", {"samples": samples.output, "labels": labels.output}, {}, store)
    again = run_stage("construct", {"samples": samples.output, "labels": labels.output}, {"method": "best_vs_worst"}, store)
    other = run_stage("construct", {"samples": samples.output, "labels": labels.output}, {"seed": 1}, store)
    assert not first.cached and again.cached and again.output == first.output
    assert not other.cached and other.output != first.output


def test_filter_drops_with_named_reasons(store):
    from prefloop.datasets_spec import PREFERENCES
    from prefloop.stage import StageConfig, StageSpec

    class Empty(StageConfig):
        pass

    table = pa.table({
        "pair_id": ["1", "2", "3", "4"], "prompt_id": ["a", "b", "c", "d"],
        "prompt": ["x?", "y?", "x?", "z?"],
        "chosen": ["good", "same", "good ", "fine"], "rejected": ["bad", "same ", "bad", "worse"],
        "score_chosen": [1.0, 1.0, 1.0, 0.5], "score_rejected": [0.0, 0.0, 0.0, 0.5],
    })
    built = put(store, StageSpec("hand-pairs", "1", Empty, "preferences", {}, PREFERENCES), table)
    # pair 2 differs only by whitespace, so the contract lets it in and the filter catches it.
    result = run_stage("filter", {"preferences": built.output}, {}, store)
    assert result.rows == 1
    assert result.drops == {"chosen_equals_rejected": 1, "duplicate_pair": 1, "tie": 1}
    drops = store.read_table(result.ref, "drops").to_pylist()
    assert {(d["row_id"], d["reason"]) for d in drops} == {("2", "chosen_equals_rejected"), ("3", "duplicate_pair"),
                                                          ("4", "tie")}


def test_stage_input_errors_name_the_roles(store):
    with pytest.raises(StageInputError, match="missing input role"):
        run_stage("filter", {}, {}, store)
    with pytest.raises(StageInputError, match="unknown input role"):
        run_stage("filter", {"pairs": "x"}, {}, store)
    with pytest.raises(StageInputError, match="min_margn: Extra inputs are not permitted.*Valid keys"):
        run_stage("filter", {}, {"min_margn": 0.1}, store)  # typo in a config key is an error


def test_paired_gain():
    gain, stderr, n = paired_gain({"a": True, "b": True, "c": False, "d": True},
                                  {"a": False, "b": True, "c": False, "d": False, "e": True})
    assert n == 4 and gain == pytest.approx(0.5)
    # d = [1, 0, 0, 1]: sample std 0.57735, / sqrt(4)
    assert stderr == pytest.approx(math.sqrt(1 / 3) / 2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """prompts -> tiny SFT model, shared by the model-calling stage tests."""
    from prefloop.storage import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("tiny") / "store")
    task = {"min_ops": 1, "max_ops": 1}
    made = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 8, "task": task}, store)
    model = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}}, store)
    return store, made, model


def test_prompts_are_split_and_disjoint(tiny_run):
    store, made, _ = tiny_run
    table = store.read_table(made.ref).to_pylist()
    train = {r["prompt"] for r in table if r["split"] == "train"}
    heldout = {r["prompt"] for r in table if r["split"] == "heldout"}
    assert len(train) == 16 and len(heldout) == 8 and not train & heldout
    assert all(r["reference_solution"].endswith("A:" + r["reference_answer"]) for r in table)


def test_sft_writes_a_model_artifact(tiny_run):
    store, _, model = tiny_run
    files = {f.path for f in store.read_manifest(model.ref).files}
    assert {"files/model.safetensors", "files/config.json", "files/tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert store.read_table(model.ref, "train_log").num_rows > 0


def test_sample_label_and_evaluate_on_a_tiny_model(tiny_run):
    store, made, model = tiny_run
    config = {"max_prompts": 4, "n": 3, "max_new_tokens": 8, "seed": 5}
    samples = run_stage("sample", {"policy": model.output, "prompts": made.output}, config, store)
    table = store.read_table(samples.ref)
    assert table.num_rows == 12
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(v <= 0 for v in table.column("sum_logprob").to_pylist())
    again = run_stage("sample", {"policy": model.output, "prompts": made.output}, config, store)
    assert again.cached
    labels = run_stage("label", {"samples": samples.output, "prompts": made.output}, {}, store)
    verdicts = store.read_table(labels.ref).column("verdict").to_pylist()
    assert len(verdicts) == 12 and set(verdicts) <= {"correct", "incorrect", "unparseable", "truncated"}
    metrics = run_stage("evaluate", {"policy": model.output, "prompts": made.output},
                             {"max_prompts": 8, "max_new_tokens": 8}, store)
    rows = {r["metric"]: r for r in store.read_table(metrics.ref).to_pylist()}
    assert rows["accuracy"]["count"] == 8 and 0.0 <= rows["accuracy"]["value"] <= 1.0
    assert store.read_table(metrics.ref, "eval_results").num_rows == 8


def test_labeler_must_exist(tiny_run):
    store, made, model = tiny_run
    samples = run_stage("sample", {"policy": model.output, "prompts": made.output},
                           {"max_prompts": 2, "n": 1, "max_new_tokens": 4}, store)
    with pytest.raises(ValueError, match="exact_answer"):
        run_stage("label", {"samples": samples.output, "prompts": made.output}, {"labeler": "nope"}, store)


def test_train_refuses_an_empty_preference_artifact(tiny_run):
    from prefloop.datasets_spec import PREFERENCES
    from prefloop.stage import StageConfig, StageSpec

    class Empty(StageConfig):
        pass

    store, _, model = tiny_run
    empty = put(store, StageSpec("hand-empty", "1", Empty, "preferences", {}, PREFERENCES),
                PREFERENCES.schema.empty_table())
    before = set(store.list())
    with pytest.raises(ValueError, match="nothing to train on"):
        run_stage("train", {"preferences": empty.output, "policy": model.output, "reference": model.output}, {}, store)
    assert set(store.list()) == before


def test_rounds_sample_fresh_prompts():
    table = pa.table({"prompt_id": [str(i) for i in range(10)], "split": ["train"] * 8 + ["heldout"] * 2})
    ids = lambda t: t.column("prompt_id").to_pylist()  # noqa: E731
    assert ids(select_prompts(table, "train", 3, block=0)) == ["0", "1", "2"]
    assert ids(select_prompts(table, "train", 3, block=1)) == ["3", "4", "5"]
    assert ids(select_prompts(table, "train", 3, block=2)) == ["6", "7", "0"]  # wraps around
    assert ids(select_prompts(table, "heldout", None)) == ["8", "9"]
