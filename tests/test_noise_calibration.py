"""The calibrated label-flip estimate (Natarajan et al. 2013), made before the filter acts, and the per-pair
posterior of a wrong label: hand-derived numbers, and a simulation of ensemble members that share mistakes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prefloop.datasets_spec import LABELS, PREFERENCES, conform
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.tasks.common.confidence import (
    MISRANKING_METRIC,
    MisrankingCalibration,
    estimated_flip_rate,
    pair_flip_rate,
)
from prefloop.tasks.filtering.noise import (
    Ensemble,
    calibrated_flip_rate,
    estimate_flip_rate,
    flip_posterior,
    noise_corrected_flip_rate,
    pooled_standard_error,
)
from prefloop.tasks.filtering.stage import FilterConfig, apply_filters
from prefloop.tasks.registry import run_stage


class _Empty(StageConfig):
    pass


def pairs_table(n: int) -> pa.Table:
    rows = [{"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": "x?", "chosen": f"good {i}", "rejected": f"bad {i}",
             "score_chosen": 1.0, "score_rejected": 0.0, "chosen_sample_id": f"c{i}", "rejected_sample_id": f"r{i}",
             "method": "best_vs_worst"} for i in range(n)]
    return conform(pa.Table.from_pylist(rows), PREFERENCES)[0]


def member_labels(margins: np.ndarray) -> pa.Table:
    """Labels as label-rm writes them for samples: member m scores chosen i with margins[i, m], rejected 0."""
    rows = []
    for index, values in enumerate(margins):
        for member, value in enumerate(values):
            rows.append({"target_id": f"c{index}", "labeler": f"rm{member}", "score": float(value)})
            rows.append({"target_id": f"r{index}", "labeler": f"rm{member}", "score": 0.0})
    table = pa.Table.from_pylist([r | {"label_id": f"l{i}", "target_kind": "sample"} for i, r in enumerate(rows)])
    return conform(table, LABELS)[0]


# Ten pairs the three members agree on exactly (se = 0): seven with s = +1, three with s = −1.
STRENGTHS = np.array([1.0] * 7 + [-1.0] * 3)
# One bin, 9 clean held-out pairs, 0.5 misranked: q = (0.5 + ½) / (9 + 1) = 0.1.
ONE_BIN = MisrankingCalibration(edges=(), pairs=(9,), misranked=(0.5,), members=3, reference="hand")


# ---------------------------------------------------------------------------------------------
# ε from (d, q), by hand
# ---------------------------------------------------------------------------------------------
def test_flip_rate_from_disagreement_and_misranking_by_hand():
    q = np.full(10, 0.1)
    # d = 3/10, q = 0.1: ε = (0.3 − 0.1) / (1 − 0.2) = 0.25.
    assert noise_corrected_flip_rate(STRENGTHS, q) == pytest.approx(0.25)
    # A zero strength counts half a disagreement: d = (2 + ½)/10 = 0.25, ε = 0.15/0.8.
    assert noise_corrected_flip_rate(np.array([1.0] * 7 + [-1.0] * 2 + [0.0]), q) == pytest.approx(0.1875)
    # Clipped to [0, ½]: d = 0.05 < q gives 0; d = 0.9 gives (0.8)/(0.8) = 1 → ½; q ≥ ½ says nothing: ½.
    assert noise_corrected_flip_rate(np.array([1.0] * 19 + [-1.0]), np.full(20, 0.1)) == 0.0
    assert noise_corrected_flip_rate(np.array([1.0] + [-1.0] * 9), q) == 0.5
    assert noise_corrected_flip_rate(STRENGTHS, np.full(10, 0.5)) == 0.5
    assert noise_corrected_flip_rate(np.array([]), np.array([])) is None
    assert ONE_BIN.rates.tolist() == pytest.approx([0.1])
    assert calibrated_flip_rate(STRENGTHS, ONE_BIN) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Binned calibration on a constructed case
# ---------------------------------------------------------------------------------------------
def test_binned_calibration_on_a_constructed_case():
    # Held-out clean pairs: nine with |s| in 0.1..0.9 (four of them misranked) and nine with |s| in 2.1..2.9
    # (none misranked). Two bins split at the median |s| = (0.9 + 2.1)/2 = 1.5.
    small = np.array([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9])
    large = np.linspace(2.1, 2.9, 9)
    calibration = MisrankingCalibration.fit(np.concatenate([small, large]), members=3, reference="hand",
                                            max_bins=2, min_pairs_per_bin=1)
    assert calibration.edges == pytest.approx((1.5,))
    assert calibration.pairs == (9, 9) and calibration.misranked == (4.0, 0.0)
    # q_b = (m_b + ½)/(n_b + 1): 4.5/10 and 0.5/10.
    assert calibration.rates.tolist() == pytest.approx([0.45, 0.05])
    assert calibration.bin_of(np.array([0.0, -1.49, 1.5, -7.0])).tolist() == [0, 0, 1, 1]
    assert MisrankingCalibration.from_dict(calibration.to_dict()) == calibration
    # A round's pairs: ten small ones (five disagree) and ten large ones (three disagree).
    round_strengths = np.array([0.5] * 5 + [-0.5] * 5 + [2.5] * 7 + [-2.5] * 3)
    # d = 8/20 = 0.4, q̄ = (10·0.45 + 10·0.05)/20 = 0.25: ε = (0.4 − 0.25)/(1 − 0.5) = 0.3.
    assert calibrated_flip_rate(round_strengths, calibration) == pytest.approx(0.3)
    # One bin over the same held-out pairs: q = 4.5/19, so ε = (0.4 − q)/(1 − 2q) — not the binned value.
    pooled = MisrankingCalibration.fit(np.concatenate([small, large]), members=3, reference="hand", max_bins=1)
    q = 4.5 / 19
    assert calibrated_flip_rate(round_strengths, pooled) == pytest.approx((0.4 - q) / (1 - 2 * q))
    # Few pairs: no more bins than MIN_PAIRS_PER_BIN allows (18 pairs, 20 per bin → one bin).
    assert len(MisrankingCalibration.fit(np.concatenate([small, large]), 3, "hand").pairs) == 1


# ---------------------------------------------------------------------------------------------
# The estimate is made before any action
# ---------------------------------------------------------------------------------------------
def test_the_reported_estimate_is_made_before_the_filter_drops_the_disagreeing_pairs():
    labels = member_labels(np.repeat(STRENGTHS[:, None], 3, axis=1))
    config = FilterConfig(strong_negative_strength=0.5, negative_strength_action="drop")
    result = apply_filters(pairs_table(10), config, ensemble_labels=labels, misranking=ONE_BIN)
    assert result.reasons.count("strength_negative") == 3
    assert result.metrics["flip_rate_estimator"] == "calibrated"
    assert result.metrics["estimated_flip_rate"] == pytest.approx(0.25)  # the pre-action value, by hand above
    assert result.metrics["flip_rate_disagreement"] == pytest.approx(0.3)
    assert result.metrics["flip_rate_misranking"] == pytest.approx(0.1)
    # On the seven kept pairs: d = 0 < q, so 0 — the biased-low figure, reported under its own name.
    assert result.metrics["estimated_flip_rate_kept"] == 0.0
    # With calibration turned off: the plug-in, here se = 0, the plain disagreement 0.3.
    plain = apply_filters(pairs_table(10), config.model_copy(update={"calibrate_flip_rate": False}),
                          ensemble_labels=labels, misranking=ONE_BIN)
    assert plain.metrics["flip_rate_estimator"] == "plug_in" and plain.metrics["estimated_flip_rate"] == pytest.approx(0.3)


def test_a_calibration_of_another_ensemble_size_falls_back_to_the_plug_in_and_says_so():
    labels = member_labels(np.repeat(STRENGTHS[:, None], 3, axis=1))
    other = MisrankingCalibration(edges=(), pairs=(9,), misranked=(0.5,), members=5, reference="hand")
    result = apply_filters(pairs_table(10), FilterConfig(), ensemble_labels=labels, misranking=other)
    assert result.metrics["flip_rate_estimator"] == "plug_in"
    assert "5 member(s)" in result.metrics["flip_rate_calibration_note"]


# ---------------------------------------------------------------------------------------------
# Posterior probability of a wrong label, per pair
# ---------------------------------------------------------------------------------------------
def test_posterior_per_pair_by_hand():
    # ε = 0.25, q = 0.1. s < 0: 0.25·0.9 / (0.25·0.9 + 0.75·0.1) = 0.225/0.3 = 0.75;
    # s > 0: 0.25·0.1 / (0.25·0.1 + 0.75·0.9) = 0.025/0.7; s = 0: the prior.
    posterior = flip_posterior(np.array([-1.0, 2.0, 0.0]), 0.25, np.full(3, 0.1))
    assert posterior.tolist() == pytest.approx([0.75, 0.025 / 0.7, 0.25])
    # Averaged over pairs drawn from the model, the posterior is the prior: 7 agreeing, 3 disagreeing
    # pairs are what ε = 0.25, q = 0.1 predicts (d = 0.3), and (7·0.025/0.7 + 3·0.75)/10 = 0.25.
    assert flip_posterior(STRENGTHS, 0.25, np.full(10, 0.1)).mean() == pytest.approx(0.25)


def test_the_filter_writes_the_posterior_as_confidence_and_flipped_pairs_get_its_complement():
    labels = member_labels(np.repeat(STRENGTHS[:, None], 3, axis=1))
    off = apply_filters(pairs_table(10), FilterConfig(strong_negative_strength=0.5), ensemble_labels=labels,
                        misranking=ONE_BIN)
    assert off.table.column("confidence").null_count == 10  # default off: the pairs are untouched
    result = apply_filters(pairs_table(10), FilterConfig(strong_negative_strength=0.5, pair_flip_posterior=True),
                           ensemble_labels=labels, misranking=ONE_BIN)
    confidence = result.table.column("confidence").to_pylist()
    # The seven agreeing pairs: 1 − 0.025/0.7. The three flipped ones: their original label was wrong with
    # probability 0.75, so the flipped label is wrong with 0.25: confidence 0.75.
    assert confidence == pytest.approx([1 - 0.025 / 0.7] * 7 + [0.75] * 3)
    assert result.metrics["pair_flip_posterior_pairs"] == 10
    # The one definition of ε turns these into the per-pair ε of cdpo / rdpo.
    assert [pair_flip_rate(c) for c in confidence] == pytest.approx([0.025 / 0.7] * 7 + [0.25] * 3)
    # Dropped pairs get nothing; pairs without an ensemble score keep their confidence.
    dropped = apply_filters(pairs_table(10), FilterConfig(strong_negative_strength=0.5, negative_strength_action="drop",
                                                          pair_flip_posterior=True),
                            ensemble_labels=labels, misranking=ONE_BIN)
    assert dropped.table.column("confidence").to_pylist()[7:] == [None] * 3


def test_one_definition_of_epsilon_from_confidence():
    assert [pair_flip_rate(c) for c in (0.9, 0.3, 1.2, None, float("nan"))] == pytest.approx([0.1, 0.5, 0.0, None, None])
    assert estimated_flip_rate([0.9, 0.3, None]) == pytest.approx((0.1 + 0.5) / 2)  # the mean of the clamped ε_i


def test_posterior_and_consistency_exclude_each_other():
    with pytest.raises(ValueError, match="pair_flip_posterior and consistency_confidence"):
        FilterConfig(pair_flip_posterior=True, consistency_confidence=True)


# ---------------------------------------------------------------------------------------------
# Members that share mistakes: calibrated vs plug-in
# ---------------------------------------------------------------------------------------------
def shared_error_ensemble(n: int, flip_rate: float, seed: int, members: int = 3) -> tuple[Ensemble, np.ndarray]:
    """Member margins d_m = ±Δ + e + e_m: one error e ~ N(0, 1) shared by every member, and small own errors
    e_m ~ N(0, 0.1²); Δ ~ U(0, 2) the true gap; the sign is the label's (flipped with ``flip_rate``)."""
    rng = np.random.default_rng(seed)
    gap = rng.uniform(0.0, 2.0, n)
    flipped = rng.random(n) < flip_rate
    truth = gap + rng.normal(0.0, 1.0, n)
    margins = np.where(flipped, -1.0, 1.0)[:, None] * (truth[:, None] + rng.normal(0.0, 0.1, (n, members)))
    return Ensemble([f"rm{m}" for m in range(members)], margins), flipped


# The shared error misranks q = E[Φ(−Δ)] over Δ ~ U(0, 2), about 0.19, of clean pairs, while the members
# agree to within se ≈ 0.1/√3, so the plug-in's q̂ is only about 0.01 and it reads most misrankings as flips:
# its excess is (1 − 2ε)(q − q̂)/(1 − 2q̂) ≈ 0.19 at ε = 0 and ≈ 0.11 at ε = 0.2 (measured 0.188 and 0.115).
@pytest.mark.parametrize(("flip_rate", "plug_in_excess"), [(0.0, 0.15), (0.2, 0.08)])
def test_shared_member_errors_calibrated_estimate_is_right_where_the_plug_in_is_far_above(flip_rate, plug_in_excess):
    heldout, _ = shared_error_ensemble(40_000, 0.0, seed=1)  # clean held-out pairs, as train-rm has them
    calibration = MisrankingCalibration.fit(heldout.strength, members=3, reference="simulated held-out pairs")
    ensemble, flipped = shared_error_ensemble(40_000, flip_rate, seed=2)
    injected = flipped.mean()
    calibrated = calibrated_flip_rate(ensemble.strength, calibration)
    plug_in = estimate_flip_rate(ensemble.strength, pooled_standard_error(ensemble))
    # Binomial sd of the calibrated estimate with 40k pairs on each side is about 0.005; 0.02 is 4 sd.
    assert calibrated == pytest.approx(injected, abs=0.02)
    assert plug_in - injected > plug_in_excess


# ---------------------------------------------------------------------------------------------
# Through the store: train-rm's metric reaches the filter via label-rm's reward_model input
# ---------------------------------------------------------------------------------------------
def test_the_filter_stage_finds_the_calibration_of_the_reward_model_that_labelled(store):
    pairs = execute(StageSpec("hand-pairs", "1", _Empty, "preferences", {}, PREFERENCES),
                    lambda ctx: StageOutput(table=pairs_table(10)), {}, {}, store)

    def model(ctx):
        files = Path(tempfile.mkdtemp())
        (files / "config.json").write_text("{}")
        return StageOutput(files_dir=files, metrics={MISRANKING_METRIC: ONE_BIN.to_dict()})

    reward_model = execute(StageSpec("hand-train-rm", "1", _Empty, "model", {}), model, {}, {}, store)
    labels = member_labels(np.repeat(STRENGTHS[:, None], 3, axis=1))
    labelled = execute(StageSpec("hand-label-rm", "1", _Empty, "labels", {"reward_model": "model"}, LABELS),
                       lambda ctx: StageOutput(table=labels), {"reward_model": reward_model.output}, {}, store)
    result = run_stage("filter", {"preferences": pairs.output, "ensemble_labels": labelled.output}, {}, store)
    assert result.metrics["flip_rate_estimator"] == "calibrated"
    assert result.metrics["estimated_flip_rate"] == pytest.approx(0.25)
    assert result.metrics["flip_rate_calibration"] == reward_model.output
    # Labels not written by a reward-model stage: no calibration to find.
    plain = execute(StageSpec("hand-labels", "1", _Empty, "labels", {}, LABELS),
                    lambda ctx: StageOutput(table=labels), {}, {}, store)
    result = run_stage("filter", {"preferences": pairs.output, "ensemble_labels": plain.output}, {}, store)
    assert result.metrics["flip_rate_estimator"] == "plug_in"


def test_train_rm_stores_the_members_misranking_rates(monkeypatch):
    from prefloop.tasks import reward_model
    from prefloop.tasks.training.recipes import reward_model as recipe

    # Two fake members scoring a completion by its length, member 1 also adding 1 to "b"-answers: the
    # strengths s = mean of the members' raw margins are the hand values below.
    def score_texts(model, tokenizer, prompts, completions, batch_size=64):
        return np.array([len(c) + (model * (c.startswith("b"))) for c in completions], dtype=np.float64)

    monkeypatch.setattr(recipe, "score_texts", score_texts)
    heldout = pairs_table(3).set_column(2, "prompt", pa.array(["x1", "x2", "x3"]))
    chosen = ["aaaa", "aa", "aaa"]
    rejected = ["b", "bbbbb", "bb"]
    heldout = heldout.set_column(heldout.column_names.index("chosen"), "chosen", pa.array(chosen))
    heldout = heldout.set_column(heldout.column_names.index("rejected"), "rejected", pa.array(rejected))
    monkeypatch.setattr(reward_model, "fit_standardisation", lambda *a, **k: None)
    monkeypatch.setattr(reward_model, "aggregate_rewards", lambda rewards, *a, **k: np.asarray(rewards).mean(axis=0))
    metrics = reward_model.evaluate_reward_models([0, 1], None, heldout)
    # Member 0 margins: 3, −3, 1; member 1: 2, −4, 0; s = 2.5, −3.5, 0.5 → one bin, 1 misranked of 3.
    stored = MisrankingCalibration.from_dict(metrics[MISRANKING_METRIC])
    assert stored.pairs == (3,) and stored.misranked == (1.0,) and stored.members == 2
