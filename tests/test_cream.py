"""CREAM (Wang et al. 2024): Kendall τ-b between this round's and the previous round's rewards of a prompt's
responses → C = (τ + 1)/2 → the confidence of the prompt's pairs. Hand-derived numbers."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import kendalltau

from prefloop.datasets_spec import LABELS, PREFERENCES, conform
from prefloop.stage import StageInputError
from prefloop.tasks.common.confidence import pair_flip_rate
from prefloop.tasks.filtering.cream import consistency_rate, kendall_tau_b, prompt_consistency
from prefloop.tasks.filtering.stage import FilterConfig, apply_filters


def labels(scores: dict[str, list[float | None]], labeler: str = "rm:now") -> pa.Table:
    """Per prompt, the rewards of its responses s0, s1, ... (None: that response is not scored)."""
    rows = [{"label_id": f"{labeler}-{prompt}-{i}", "target_id": f"{prompt}-s{i}", "target_kind": "sample",
             "prompt_id": prompt, "labeler": labeler, "score": score}
            for prompt, values in scores.items() for i, score in enumerate(values) if score is not None]
    return conform(pa.Table.from_pylist(rows), LABELS)[0]


def pairs(prompts: list[str], confidence: list[float | None] | None = None) -> pa.Table:
    rows = [{"pair_id": f"p{i}", "prompt_id": prompt, "prompt": f"{prompt}?", "chosen": "a", "rejected": "b",
             "score_chosen": 1.0, "score_rejected": 0.0, "method": "best_vs_worst",
             "confidence": None if confidence is None else confidence[i]} for i, prompt in enumerate(prompts)]
    return conform(pa.Table.from_pylist(rows), PREFERENCES)[0]


# ---------------------------------------------------------------------------------------------
# Kendall τ-b
# ---------------------------------------------------------------------------------------------
def test_kendall_tau_b_on_hand_numbers():
    # Six pairs of responses, one discordant (the 2-3 swap): τ = (5 − 1)/6.
    assert kendall_tau_b(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(4 / 6)
    # Ties: x ties once (responses 0, 1), y ties once (1, 2). Concordant 4, discordant 0, n₀ = 6:
    # τ_b = 4 / sqrt((6 − 1)(6 − 1)) = 0.8.
    x, y = np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0, 3.0])
    assert kendall_tau_b(x, y) == pytest.approx(0.8)
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)  # scipy's τ-b
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 8).astype(float), rng.integers(0, 4, 8).astype(float)
        assert kendall_tau_b(a, b) == pytest.approx(kendalltau(a, b).statistic)
    # Undefined: one response, or one round's rewards all tied.
    assert math.isnan(kendall_tau_b(np.array([1.0]), np.array([2.0])))
    assert math.isnan(kendall_tau_b(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))


def test_identical_rankings_give_confidence_one_and_reversed_give_zero():
    assert consistency_rate(kendall_tau_b(np.array([0.1, 5.0, 2.0]), np.array([1.0, 9.0, 3.0]))) == 1.0
    reversed_rate = consistency_rate(kendall_tau_b(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])))
    assert reversed_rate == 0.0
    # Through the one definition of ε: the reversed prompt's pairs get ε = ½ (no information), not 1.
    assert pair_flip_rate(reversed_rate) == 0.5 and pair_flip_rate(1.0) == 0.0


# ---------------------------------------------------------------------------------------------
# Confidence per pair through the filter
# ---------------------------------------------------------------------------------------------
NOW = {"q0": [1.0, 2.0, 3.0, 4.0], "q1": [1.0, 2.0, 3.0], "q2": [5.0, 1.0], "q3": [0.3, 0.2, 0.1]}
BEFORE = {"q0": [1.0, 3.0, 2.0, 4.0], "q1": [3.0, 2.0, 1.0], "q3": [7.0, None, None]}  # q2 never scored before


def test_each_pair_gets_the_consistency_of_its_prompt():
    table = pairs(["q0", "q0", "q1", "q2", "q3"], confidence=[None, None, None, 0.9, 0.8])
    config = FilterConfig(consistency_confidence=True, drop_duplicates=False)
    result = apply_filters(table, config, consistency_labels=labels(NOW), previous_labels=labels(BEFORE, "rm:before"))
    # q0: τ = 4/6, C = (4/6 + 1)/2 = 5/6 for both of its pairs; q1 reversed: C = 0; q2 has no previous
    # scores and q3 only one response scored in both rounds: they keep the confidence they came with.
    assert result.table.column("confidence").to_pylist() == pytest.approx([5 / 6, 5 / 6, 0.0, 0.9, 0.8])
    assert result.metrics["consistency_pairs"] == 3 and result.metrics["consistency_unscored_pairs"] == 2
    assert result.metrics["consistency_prompts"] == 2
    assert result.metrics["consistency_mean"] == pytest.approx((5 / 6 + 5 / 6 + 0) / 3)
    # Off by default: nothing is written.
    plain = apply_filters(table, FilterConfig(drop_duplicates=False), consistency_labels=labels(NOW),
                          previous_labels=labels(BEFORE, "rm:before"))
    assert plain.table.column("confidence").to_pylist() == [None, None, None, 0.9, 0.8]


def test_a_response_missing_in_one_round_is_left_out_of_its_prompts_tau():
    before = {"q0": [1.0, 3.0, None, 4.0]}  # response 2 unscored before: τ over responses 0, 1, 3 = 1
    consistency = prompt_consistency(labels(NOW), labels(before, "rm:before"))
    assert consistency.rate == {"q0": 1.0} and consistency.responses == {"q0": 3}


def test_missing_previous_scores_and_missing_inputs_are_clear_errors():
    table = pairs(["q2"])
    with pytest.raises(StageInputError, match="none of the 1 pairs' prompts has two responses scored in both"):
        apply_filters(table, FilterConfig(consistency_confidence=True), consistency_labels=labels(NOW),
                      previous_labels=labels(BEFORE, "rm:before"))
    with pytest.raises(StageInputError, match="consistency_labels=REF and previous_labels=REF"):
        apply_filters(table, FilterConfig(consistency_confidence=True), consistency_labels=labels(NOW))
    two_labelers = pa.concat_tables([labels(NOW), labels(NOW, "rm:other")])
    with pytest.raises(StageInputError, match="consistency_labels has 2 labelers.*consistency_labeler"):
        apply_filters(pairs(["q0"]), FilterConfig(consistency_confidence=True), consistency_labels=two_labelers,
                      previous_labels=labels(BEFORE, "rm:before"))
    # Naming the labeler resolves it; naming one that is absent says which there are.
    named = apply_filters(pairs(["q0"]), FilterConfig(consistency_confidence=True, consistency_labeler="rm:other"),
                          consistency_labels=two_labelers, previous_labels=labels(BEFORE, "rm:before"))
    assert named.table.column("confidence").to_pylist() == pytest.approx([5 / 6])
    with pytest.raises(StageInputError, match="previous_labels has no labeler 'rm:gone'"):
        apply_filters(pairs(["q0"]), FilterConfig(consistency_confidence=True, previous_labeler="rm:gone"),
                      consistency_labels=labels(NOW), previous_labels=labels(BEFORE, "rm:before"))
