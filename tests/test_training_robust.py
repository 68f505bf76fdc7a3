"""Robust losses in the train stage: ε per pair from confidences, or the filter's flip-rate estimate.

Every run here trains one step with the reference log-probs set so that each pair's DPO margin is
exactly h = D (reference = policy − D/2 on the chosen side, + D/2 on the rejected side), so the first
logged loss has a closed form. With z = β·D and ℓ(z) = −log σ(z), and ℓ(−z) − ℓ(z) = z:

    cdpo: (1 − ε)·ℓ(z) + ε·ℓ(−z)             = ℓ(z) + ε·z
    rdpo: [(1 − ε)·ℓ(z) − ε·ℓ(−z)] / (1 − 2ε) = ℓ(z) − ε·z / (1 − 2ε)

and the logged loss is their mean over the batch (all pairs).
"""

import logging
import math

import pyarrow as pa
import pytest
import torch
from helpers import arithmetic_pairs

from prefloop.datasets_spec import PREFERENCES
from prefloop.datasets_spec.schemas import REFERENCE_LOGPS
from prefloop.stage import (
    StageConfig,
    StageOutput,
    StageSpec,
    execute,
    output_ref,
    parse_config,
    resolve_inputs,
)
from prefloop.storage import ArtifactStore
from prefloop.tasks.registry import run_stage
from prefloop.tasks.training import preference
from prefloop.tasks.training.artifacts import load_policy
from prefloop.tasks.training.configs import DPOConfig
from prefloop.tasks.training.recipes.dpo import prepare_pairs, reference_logprobs, train_dpo

TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 64}
PAIRS = 4
MARGIN = 2.0  # h = D for every pair
BETA = 1.0
Z = BETA * MARGIN


def softplus_loss(z: float) -> float:
    """ℓ(z) = −log σ(z)."""
    return math.log1p(math.exp(-z))


class Empty(StageConfig):
    pass


def put(store: ArtifactStore, name: str, kind: str, table: pa.Table, table_spec, metrics: dict | None = None):
    """Publish a hand-made artifact (``name`` keeps artifacts of the same kind apart)."""
    spec = StageSpec(f"hand-{name}", "1", Empty, kind, {}, table_spec)
    return execute(spec, lambda ctx: StageOutput(table=table, metrics=metrics or {}), {}, {}, store)


def pairs_table(confidence: list[float | None]) -> pa.Table:
    return arithmetic_pairs(PAIRS, margins=[1.0] * PAIRS, confidence=confidence)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store with a tiny SFT model and reference log-probs that put every pair's margin at h = D."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = ArtifactStore(tmp_path_factory.mktemp("robust") / "store")
    made = run_stage("prompts", {}, {"n_train": 16, "n_heldout": 0, "task": {"min_ops": 1, "max_ops": 1}}, store)
    model = run_stage("sft", {"prompts": made.output}, {"model": TINY_MODEL, "training": {"max_steps": 3, "batch_size": 8}},
                    store)
    policy, tokenizer = load_policy(store.local_files(model.ref))
    table = pairs_table([None] * PAIRS)
    triples = list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))
    prepared = prepare_pairs(tokenizer, triples)
    scored = reference_logprobs(policy, prepared, tokenizer.pad_token_id)
    logps = put(store, "reference-logps", "reference_logps", pa.table({
        "pair_id": table.column("pair_id"),
        "chosen_logp": (scored.chosen.double() - MARGIN / 2).tolist(),
        "rejected_logp": (scored.rejected.double() + MARGIN / 2).tolist(),
        "chosen_tokens": pa.array([e.completion_length for e in prepared.chosen], pa.int32()),
        "rejected_tokens": pa.array([e.completion_length for e in prepared.rejected], pa.int32()),
    }), REFERENCE_LOGPS)
    yield store, {"policy": model.output, "reference": model.output, "reference_logps": logps.output}
    torch.set_num_threads(threads)


def train(setup, preferences: str, loss: str, **config):
    store, inputs = setup
    training = {"loss": loss, "beta": BETA, "max_steps": 1, "batch_size": PAIRS, "learning_rate": 1e-4,
                "label_flip_rate": 0.1}
    result = run_stage("train", inputs | {"preferences": preferences}, {"training": training, **config}, store)
    log = store.read_table(result.ref, "train_log").to_pylist()
    (first_loss,) = [row["value"] for row in log if row["step"] == 1 and row["metric"] == "loss"]
    return result, first_loss


def test_confidence_gives_each_pair_its_flip_rate_in_cdpo(setup) -> None:
    store, _ = setup
    certain = put(store, "certain", "preferences", pairs_table([1.0] * PAIRS), PREFERENCES)
    coin_flip = put(store, "coin-flip", "preferences", pairs_table([0.5] * PAIRS), PREFERENCES)
    mixed = put(store, "mixed", "preferences", pairs_table([1.0, 0.5, 0.8, None]), PREFERENCES)

    # conf = 1: ε = 0, plain DPO; conf = 0.5: ε = min(1 − 0.5, 0.5) = 0.5, which adds 0.5·z per pair.
    _, certain_loss = train(setup, certain.output, "cdpo")
    _, coin_flip_loss = train(setup, coin_flip.output, "cdpo")
    assert certain_loss == pytest.approx(softplus_loss(Z), abs=1e-4)
    assert coin_flip_loss - certain_loss == pytest.approx(0.5 * Z, abs=1e-4)

    # ε = [0, 0.5, 0.2, 0.1 (null: the configured label_flip_rate)], mean 0.2.
    result, mixed_loss = train(setup, mixed.output, "cdpo")
    assert mixed_loss == pytest.approx(softplus_loss(Z) + 0.2 * Z, abs=1e-4)
    assert result.metrics["label_flip_rate_source"] == "confidence"
    assert result.metrics["label_flip_rate_mean"] == pytest.approx(0.2)
    assert result.metrics["label_flip_rate_pairs_from_confidence"] == 3

    # label_flip_rate_source: config ignores the confidences.
    result, config_loss = train(setup, mixed.output, "cdpo", label_flip_rate_source="config")
    assert config_loss == pytest.approx(softplus_loss(Z) + 0.1 * Z, abs=1e-4)
    assert result.metrics["label_flip_rate"] == 0.1 and "label_flip_rate_mean" not in result.metrics


def test_rdpo_holds_confidence_flip_rates_below_one_half(setup, caplog) -> None:
    store, _ = setup
    coin_flip = put(store, "coin-flip", "preferences", pairs_table([0.5] * PAIRS), PREFERENCES)
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        result, loss = train(setup, coin_flip.output, "rdpo", max_label_flip_rate=0.25)
    # ε = 0.5 is outside rdpo's range [0, 0.5): every pair trains with the ceiling 0.25.
    assert loss == pytest.approx(softplus_loss(Z) - 0.25 * Z / (1 - 2 * 0.25), abs=1e-4)
    assert result.metrics["label_flip_rate_clamped_pairs"] == PAIRS
    assert "max_label_flip_rate" in caplog.text


def test_filter_estimate_is_read_from_the_filter_manifest(setup) -> None:
    store, _ = setup
    raw = put(store, "confident", "preferences", pairs_table([0.9, 0.8, 0.7, 0.8]), PREFERENCES)
    # Without an ensemble the filter estimates ε as the mean of min(1 − confidence, ½) over the pairs as they arrive: 0.2.
    filtered = run_stage("filter", {"preferences": raw.output}, {}, store)
    assert filtered.metrics["estimated_flip_rate"] == pytest.approx(0.2)
    result, loss = train(setup, filtered.output, "rdpo", label_flip_rate_source="filter_estimate")
    assert loss == pytest.approx(softplus_loss(Z) - 0.2 * Z / (1 - 2 * 0.2), abs=1e-4)
    assert result.metrics["label_flip_rate"] == pytest.approx(0.2)
    assert store.read_manifest(result.ref).metrics["estimated_flip_rate"] == pytest.approx(0.2)


def test_filter_estimate_above_the_loss_range_is_clamped_and_logged(setup, caplog) -> None:
    store, _ = setup
    noisy = put(store, "noisy-estimate", "preferences", pairs_table([None] * PAIRS), PREFERENCES,
                metrics={"estimated_flip_rate": 0.5})
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        result, loss = train(setup, noisy.output, "rdpo", label_flip_rate_source="filter_estimate")
    assert result.metrics["label_flip_rate"] == 0.4  # the default max_label_flip_rate
    assert loss == pytest.approx(softplus_loss(Z) - 0.4 * Z / (1 - 2 * 0.4), abs=1e-4)
    assert "estimated label-flip rate 0.5000" in caplog.text
    # cdpo takes 0.5 as it is.
    result, loss = train(setup, noisy.output, "cdpo", label_flip_rate_source="filter_estimate")
    assert result.metrics["label_flip_rate"] == 0.5
    assert loss == pytest.approx(softplus_loss(Z) + 0.5 * Z, abs=1e-4)


def test_a_missing_filter_estimate_is_an_error_that_says_how_to_fix_it(setup) -> None:
    store, _ = setup
    unfiltered = put(store, "no-estimate", "preferences", pairs_table([None] * PAIRS), PREFERENCES)
    with pytest.raises(ValueError, match=r"no 'estimated_flip_rate'.*ensemble_labels.*label_flip_rate_source: config"):
        train(setup, unfiltered.output, "rdpo", label_flip_rate_source="filter_estimate")
    with pytest.raises(ValueError, match="does not read a label-flip rate"):
        train(setup, unfiltered.output, "sigmoid", label_flip_rate_source="filter_estimate")


def test_the_flip_rate_source_is_part_of_the_stage_fingerprint(setup) -> None:
    store, inputs = setup
    pairs = put(store, "fingerprint", "preferences", pairs_table([None] * PAIRS), PREFERENCES)
    resolved = resolve_inputs(preference.SPEC, inputs | {"preferences": pairs.output}, store)
    ids = {source: output_ref(preference.SPEC, resolved, parse_config(preference.SPEC, {
        "training": {"loss": "rdpo"}, "label_flip_rate_source": source})).id
           for source in ("confidence", "config", "filter_estimate")}
    assert len(set(ids.values())) == 3


def test_train_dpo_refuses_per_pair_flip_rates_for_a_loss_without_one(setup) -> None:
    store, inputs = setup
    policy, tokenizer = load_policy(store.local_files(store.resolve(inputs["policy"])))
    table = pairs_table([None] * PAIRS)
    triples = list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))
    prepared = prepare_pairs(tokenizer, triples, None, [0.1] * PAIRS)
    with pytest.raises(ValueError, match="does not read ε"):
        train_dpo(policy, policy, tokenizer, triples, DPOConfig(max_steps=1), prepared=prepared)
    with pytest.raises(ValueError, match="one per pair"):
        prepare_pairs(tokenizer, triples, None, [0.1])


def test_off_policy_pairs_without_confidences_mix_in_with_null_confidence():
    """The round's pairs carry confidences, an earlier round's (best-of-n) do not: they still mix in, and
    their ε falls back to training.label_flip_rate."""
    current = arithmetic_pairs(4, seed=1, confidence=[0.9, 0.8, 0.7, 0.6])
    earlier = arithmetic_pairs(6, seed=2).drop_columns(["margin"])

    class Context:
        inputs = {"preferences": "now", "off_policy": "earlier"}
        tables = {"preferences": current, "off_policy": earlier}

        def read(self, role, spec):
            return self.tables[role]

        def has(self, role):
            return role in self.tables

    config = preference.TrainConfig(off_policy_ratio=0.5, round=2, training={"loss": "cdpo", "label_flip_rate": 0.1})
    table, mixed = preference.training_pairs(Context(), config)
    assert mixed == 4 and table.num_rows == 8
    assert table.column("confidence").to_pylist()[4:] == [None] * 4
    assert table.column("margin").to_pylist()[4:] == [None] * 4
    _, per_pair, _ = preference.label_flip_rates(Context(), config, table)
    assert per_pair == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.1, 0.1, 0.1, 0.1])
