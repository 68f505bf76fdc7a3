"""RSO: rejection sampling toward π* ∝ π_sft·exp(r/β) (Liu et al. 2024, Algorithm 1) and its pairing."""

import math
import random

import numpy as np
import pyarrow as pa
import pytest

from prefloop.datasets_spec import LABELS, SAMPLES
from prefloop.stage import StageConfig, StageOutput, StageSpec, execute
from prefloop.tasks.construct import Candidate, pair_accepted, rejection_sample
from prefloop.tasks.registry import run_stage

# A small discrete "policy": 4 possible completions with known π_sft probabilities and rewards.
PI_SFT = np.array([0.4, 0.3, 0.2, 0.1])
REWARDS = np.array([0.0, 0.5, 1.0, 1.5])
# χ² with 3 degrees of freedom: P(χ² > 11.34) = 0.01.
CHI2_3DOF_99 = 11.34


def accepted_counts(beta: float, n_candidates: int, n_accepted: int, prompts: int, seed: int = 0) -> np.ndarray:
    """How often each outcome is accepted when every prompt draws ``n_candidates`` from π_sft."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(PI_SFT))
    for _ in range(prompts):
        draws = rng.choice(len(PI_SFT), size=n_candidates, p=PI_SFT)
        for index in rejection_sample(list(REWARDS[draws]), n_accepted, beta, rng):
            counts[draws[index]] += 1
    return counts


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def optimal_policy(beta: float) -> np.ndarray:
    weights = PI_SFT * np.exp(REWARDS / beta)
    return weights / weights.sum()


def test_accepted_frequencies_match_the_optimal_policy() -> None:
    # The paper's defaults: N = 64 candidates, M = 8 accepted, β = 0.5; 1000 prompts, fixed seed.
    target = optimal_policy(0.5)
    assert target == pytest.approx([0.0851, 0.1734, 0.3143, 0.4272], abs=1e-4)  # by hand: 0.4·e^0, 0.3·e^1, …
    counts = accepted_counts(beta=0.5, n_candidates=64, n_accepted=8, prompts=1000)
    assert counts.sum() == 8000
    frequencies = counts / counts.sum()
    assert 0.5 * np.abs(frequencies - target).sum() < 0.02  # total variation
    assert chi_square(counts, target) < CHI2_3DOF_99
    # The test has power: the same draws are far from π_sft (what plain sampling would give).
    assert chi_square(counts, PI_SFT) > 100 * CHI2_3DOF_99


def test_a_large_beta_keeps_the_sft_distribution() -> None:
    counts = accepted_counts(beta=1000.0, n_candidates=64, n_accepted=8, prompts=500, seed=1)
    assert chi_square(counts, PI_SFT) < CHI2_3DOF_99
    assert chi_square(counts, optimal_policy(0.5)) > 100 * CHI2_3DOF_99


def test_acceptance_probability_is_exp_of_the_reward_gap() -> None:
    # Rewards [0, 1], β = 0.5, M = 1: the first candidate is accepted in the first sweep with
    # probability exp((0 − 1)/0.5) = e^-2 ≈ 0.1353; otherwise the best one (probability 1).
    rng = np.random.default_rng(7)
    trials = 20000
    first = sum(rejection_sample([0.0, 1.0], 1, 0.5, rng) == [0] for _ in range(trials))
    expected = math.exp(-2.0)
    assert abs(first / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_sweeps_remove_accepted_candidates_and_stop_at_m() -> None:
    rng = np.random.default_rng(0)
    # Equal rewards: everything is accepted at probability 1, in sampling order.
    assert rejection_sample([0.3] * 6, 4, 0.5, rng) == [0, 1, 2, 3]
    # Fewer candidates than M: all are accepted (no endless loop), each once.
    assert sorted(rejection_sample([0.0, 5.0, 1.0], 8, 0.1, rng)) == [0, 1, 2]
    # The best candidate is always accepted in the first sweep.
    for seed in range(20):
        assert 2 in rejection_sample([0.0, 0.1, 9.0, 0.2], 2, 0.5, np.random.default_rng(seed))[:2]


def test_nonfinite_reward_is_refused() -> None:
    with pytest.raises(ValueError, match="non-finite reward"):
        rejection_sample([0.0, float("nan")], 1, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="beta > 0"):
        rejection_sample([0.0, 1.0], 1, 0.0, np.random.default_rng(0))


def _candidates(scores):
    return [Candidate(f"s{i}", "p", "q?", f"answer {i}", score) for i, score in enumerate(scores)]


def test_tournament_pairs_adjacent_ranks_and_skips_ties() -> None:
    accepted = _candidates([0.2, 0.9, 0.5, 0.1, 0.7, 0.7])
    pairs = pair_accepted(accepted, "tournament", random.Random(0))
    # Ranked 0.9, 0.7, 0.7, 0.5, 0.2, 0.1 → (0.9, 0.7), (0.7, 0.5), (0.2, 0.1): all untied.
    assert [(c.score, r.score) for c, r in pairs] == [(0.9, 0.7), (0.7, 0.5), (0.2, 0.1)]
    tied = pair_accepted(_candidates([1.0, 1.0, 0.0, 0.0]), "tournament", random.Random(0))
    assert tied == []  # (1, 1) and (0, 0): ties never make a pair


def test_first_round_pairs_are_disjoint_and_labelled_by_reward() -> None:
    accepted = _candidates([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.75, 0.6])
    seen_orders = set()
    for seed in range(30):
        pairs = pair_accepted(accepted, "first_round", random.Random(seed))
        ids = [c.sample_id for pair in pairs for c in pair]
        assert len(ids) == len(set(ids)) and len(pairs) <= 4
        assert all(chosen.score > rejected.score for chosen, rejected in pairs)
        seen_orders.add(tuple(ids))
    assert len(seen_orders) > 1  # random pairing, not a fixed one
    assert pair_accepted(_candidates([1.0, 1.0]), "first_round", random.Random(0)) == []


def _hand_spec(name, kind, table_spec):
    class Empty(StageConfig):
        pass

    return StageSpec(name, "1", Empty, kind, {}, table_spec)


def test_rso_stage_builds_pairs_from_accepted_samples(store) -> None:
    rows = []
    scores = {}
    for p in range(6):
        for i in range(16):
            sample_id = f"p{p}-s{i}"
            rows.append((sample_id, f"p{p}", f"{p}+{i}?", f"A:{i}", i))
            scores[sample_id] = 1.0 if i % 3 == 0 else 0.0
    samples = pa.table({
        "sample_id": [r[0] for r in rows], "prompt_id": [r[1] for r in rows], "prompt": [r[2] for r in rows],
        "completion": [r[3] for r in rows], "sample_index": pa.array([r[4] for r in rows], pa.int32()),
        "finish_reason": ["stop"] * len(rows),
    })
    labels = pa.table({
        "label_id": [f"l-{k}" for k in scores], "target_id": list(scores), "target_kind": ["sample"] * len(scores),
        "labeler": ["exact_answer"] * len(scores), "score": list(scores.values()),
    })
    samples_ref = execute(_hand_spec("hand-samples", "samples", SAMPLES), lambda c: StageOutput(table=samples), {}, {},
                          store)
    labels_ref = execute(_hand_spec("hand-labels", "labels", LABELS), lambda c: StageOutput(table=labels), {}, {}, store)
    config = {"method": "rso", "rso": {"beta": 0.5, "num_accepted": 8}}
    result = run_stage("construct", {"samples": samples_ref.output, "labels": labels_ref.output}, config, store)
    pairs = store.read_table(result.ref).to_pylist()
    assert result.metrics["rso_accepted"] == 6 * 8
    assert pairs and all(p["method"] == "rso" and p["score_chosen"] == 1.0 and p["score_rejected"] == 0.0
                         for p in pairs)
    per_prompt = {p["prompt_id"] for p in pairs}
    assert all(sum(p["prompt_id"] == prompt for p in pairs) <= 4 for prompt in per_prompt)
    again = run_stage("construct", {"samples": samples_ref.output, "labels": labels_ref.output}, config, store)
    assert again.cached and again.output == result.output


def test_rso_config_loads_and_draws_more_candidates_than_it_accepts() -> None:
    from pathlib import Path

    from prefloop.config import load_loop_config

    config = load_loop_config(Path(__file__).parent.parent / "configs" / "rso.yaml")
    assert config.construction.method == "rso" and config.rounds >= 2
    assert config.sampling.n > config.construction.rso.num_accepted
