"""benchmarks/fidelity.py: its aggregation across seeds and claim verdicts on hand numbers, and its
--quick mode running every row end to end on the smoke config."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", REPO / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rounds(*accuracies: float, gains: tuple[float, ...] = ()) -> list[dict]:
    gains = gains or tuple(a - accuracies[0] for a in accuracies)
    return [{"round": k, "accuracy": a, "accuracy_stderr": 0.01, "gain": g, "gain_stderr": 0.02, "pairs_kept": 10}
            for k, (a, g) in enumerate(zip(accuracies, gains, strict=True))]


def test_aggregate_gives_mean_and_sd_across_seeds_and_per_seed_rises(fidelity):
    result = fidelity.aggregate({0: _rounds(0.40, 0.50, 0.60), 1: _rounds(0.20, 0.30, 0.25), 2: _rounds(0.30, 0.40, 0.50)})
    last = result["rounds"][-1]
    assert last["accuracy_mean"] == pytest.approx((0.60 + 0.25 + 0.50) / 3)
    # sd of 0.60, 0.25, 0.50 (ddof 1): mean 0.45, deviations .15, -.2, .05 → sqrt((.0225+.04+.0025)/2)
    assert last["accuracy_sd"] == pytest.approx(math.sqrt(0.065 / 2))
    assert last["gain_mean"] == pytest.approx((0.20 + 0.05 + 0.20) / 3)
    assert result["rises_per_seed"] == {0: True, 1: False, 2: True}
    assert result["rises_every_round"] is False
    assert fidelity.aggregate({0: _rounds(0.4, 0.5), 1: _rounds(0.1, 0.2)})["rises_every_round"] is True


def test_claims_are_decided_from_the_numbers_and_unmeasured_rows_say_so(fidelity):
    results = {"bon-fixed": fidelity.aggregate({0: _rounds(0.40, 0.45), 1: _rounds(0.30, 0.35)}),
               "mcts-dpo": fidelity.aggregate({0: _rounds(0.40, 0.50), 1: _rounds(0.30, 0.40)}),
               "rso": fidelity.aggregate({0: _rounds(0.40, 0.41), 1: _rounds(0.30, 0.31)}), "bon-previous": {}}
    verdicts = {claim.rule: claim.check(results) for claim in fidelity.CLAIMS}
    assert verdicts["final-round mean accuracy: mcts-dpo > bon-fixed > SFT"] is True
    assert verdicts["final-round mean accuracy: rso ≥ bon-fixed"] is False
    assert verdicts["bon-previous: accuracy rises in every round for every seed"] is None
    markdown = fidelity.render_markdown(results, [0, 1], quick=False, machine="test machine")
    assert "| RSO (rejection-sampled pairs) | 35.0 ± 7.1 | 36.0 ± 7.1 | +1.0 ± 0.0 |" in markdown
    assert "not measured" in markdown and "not run" in markdown


def test_quick_mode_runs_every_row_on_the_smoke_config(fidelity, tmp_path):
    from prefloop.storage import ArtifactStore

    assert fidelity.main(["--quick", "--store", str(tmp_path / "store"), "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "fidelity.json").read_text())
    assert set(written["rows"]) == set(fidelity.ROWS)
    for name, row in written["rows"].items():
        assert [int(s) for s in row["seeds"]] == [0, 1], name
        rounds = fidelity.ROWS[name].quick_overrides.get("rounds", fidelity.QUICK["rounds"])
        assert len(row["rounds"]) == rounds + 1, name  # SFT and each round
    noise = written["noise"]
    assert [int(s) for s in noise["seeds"]] == [0, 1]
    assert [r["rate"] for r in noise["rates"]] == list(fidelity.NOISE_RATES)
    assert all(list(r["arms"]) == list(fidelity.NOISE_ARMS) for r in noise["rates"])
    assert {r["estimators"][0] for r in noise["rates"]} == {"calibrated"}  # ε̂ from train-rm's clean held-out pairs
    for name in fidelity.RM_ROWS:
        rounds = written["overoptimisation"][name]["rounds"]
        assert len(rounds) == fidelity.QUICK_RM_ROUNDS + 1, name
        assert all(r["kl_mean"] is not None and r["reward_mean"] is not None for r in rounds), name
    store = ArtifactStore(str(tmp_path / "store"))
    for seed in ("0", "1"):
        # The noise rows train from bon-previous's SFT model and round-1 samples: the same ids, found in the store.
        shared = noise["shared"][seed]
        loop = f"fidelity-{fidelity.BASE_ROW}-seed{seed}"
        assert shared["sft"] == {"id": str(store.resolve(f"{loop}/round-0/policy")), "cached": True}
        assert shared["round-1 samples"] == {"id": str(store.resolve(f"{loop}/round-1/samples")), "cached": True}
        # rm-ensemble's labeling reward model is the noise rows' ensemble.
        assert str(store.resolve(f"fidelity-rm-ensemble-seed{seed}/reward-model")) == shared["reward model"]["id"]
        # The reward models learned from prompts that no round samples or evaluates.
        used = set(store.read_table(store.resolve(f"{loop}/prompts")).column("prompt").to_pylist())
        reward_prompts = store.read_table(store.resolve(f"fidelity-noise-seed{seed}/reward-data/prompts"))
        assert reward_prompts.num_rows == fidelity.QUICK_RM_PROMPTS
        assert not used & set(reward_prompts.column("prompt").to_pylist())
    _assert_every_quick_round_trained(fidelity, store, written)
    _assert_paired_differences(written, store)
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    # A second call tabulates the finished runs without computing anything.
    assert fidelity.main(["--quick", "--report-only", "--store", str(tmp_path / "store"), "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "fidelity.json").read_text())
    assert again["rows"] == written["rows"] and again["overoptimisation"] == written["overoptimisation"]
    assert again["noise"]["rates"] == noise["rates"]
    assert all(value["cached"] for shared in again["noise"]["shared"].values() for value in shared.values())


def _correct(store, evaluation: str) -> dict:
    table = store.read_table(store.resolve(evaluation), "eval_results")
    return {r["prompt_id"]: r["correct"] for r in table.to_pylist() if r["correct"] is not None}


def _assert_paired_differences(written: dict, store) -> None:
    """CREAM vs its baseline after the last round, recomputed here from the two evaluations' per-prompt results."""
    [compared] = written["paired"]
    assert (compared["row"], compared["against"], compared["round"]) == ("cream", "bon-previous-cdpo", 2)
    for seed, value in compared["per_seed"].items():
        mine, theirs = (_correct(store, f"fidelity-{row}-seed{seed}/round-2/metrics")
                        for row in ("cream", "bon-previous-cdpo"))
        shared = sorted(set(mine) & set(theirs))
        d = [float(mine[p]) - float(theirs[p]) for p in shared]
        mean = sum(d) / len(d)
        assert value["prompts"] == len(shared) > 0
        assert value["difference"] == pytest.approx(mean)
        assert value["stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)))
    cream, baseline = compared["confidences"]["cream"], compared["confidences"]["bon-previous-cdpo"]
    assert [r["round"] for r in cream] == [1, 2] and cream[0]["consistency_mean"] is None  # none in round 1
    assert 0 <= cream[1]["consistency_mean"] <= 1 and all(r["consistency_mean"] is None for r in baseline)
    assert cream[0]["epsilon_mean"] == baseline[0]["epsilon_mean"]  # round 1 is the same run
    assert compared["difference_mean"] == pytest.approx(
        sum(v["difference"] for v in compared["per_seed"].values()) / len(compared["per_seed"]))


# A round whose training does not move the policy leaves the evaluation's KL estimate at its sampling noise: with
# the smoke config's own DPO step (lr 3e-6, one step) it was 0.0004-0.002 in magnitude, either sign.
MOVED_KL = 0.02


def _weights(manifest) -> str:
    return next(f.sha256 for f in manifest.files if f.path.endswith("model.safetensors"))


def _assert_every_quick_round_trained(fidelity, store, written: dict) -> None:
    """Every round of every quick row trained on pairs: optimizer steps > 0, weights that differ from the SFT
    model's, and (where the evaluation measures it) a KL to the round's reference above the estimate's noise."""
    def metric(ref: str, name: str) -> float:
        return next(r["value"] for r in store.read_table(store.resolve(ref)).to_pylist() if r["metric"] == name)

    for seed in ("0", "1"):
        sft = _weights(store.read_manifest(store.resolve(f"fidelity-{fidelity.BASE_ROW}-seed{seed}/round-0/policy")))
        rounds = {f"fidelity-{name}-seed{seed}": row.quick_overrides.get("rounds", fidelity.QUICK["rounds"])
                  for name, row in fidelity.ROWS.items()}
        rounds |= {f"fidelity-{name}-seed{seed}": fidelity.QUICK_RM_ROUNDS for name in fidelity.RM_ROWS}
        for loop, count in rounds.items():
            for k in range(1, count + 1):
                # No pair kept: the loop carries the policy over untrained (and publishes no round policy).
                assert metric(f"{loop}/round-{k}/metrics", "pairs_kept") > 0, (loop, k)
                trained = store.read_manifest(store.resolve(f"{loop}/round-{k}/policy")).metrics
                assert trained["pairs"] > 0 and trained["steps"] > 0, (loop, k, trained)
                assert _weights(store.read_manifest(store.resolve(f"{loop}/round-{k}/policy"))) != sft, (loop, k)
                assert metric(f"{loop}/round-{k}/metrics", "kl_to_reference") > MOVED_KL, (loop, k)
        # The CREAM row's round 2 trained on pairs whose confidence came from the two rounds' consistency.
        consistency = store.read_manifest(store.resolve(f"fidelity-cream-seed{seed}/round-2/preferences-filtered"))
        assert consistency.metrics["consistency_pairs"] > 0, consistency.metrics
        baseline = store.read_manifest(store.resolve(f"fidelity-bon-previous-cdpo-seed{seed}/round-2/preferences-filtered"))
        assert "consistency_pairs" not in baseline.metrics
        for record in written["noise"]["rates"]:
            for arm, cell in record["arms"].items():
                value = cell["per_seed"][seed]
                policy = store.read_manifest(store.resolve(
                    f"fidelity-noise-seed{seed}/noise-{round(100 * record['rate'])}-{arm}/round-1/policy"))
                assert value["pairs"] > 0 and policy.metrics["steps"] > 0, (seed, record["rate"], arm)
                # cDPO at ε = 0.5 has no gradient where the policy equals its reference (d/dx = σ(x) − (1 − ε)
                # = 0 at x = 0), so it cannot move: the quick reward model is at chance (a few dozen pairs)
                # and the calibrated ε̂ it gives is 0.5. Every other arm must move.
                if value["loss"] != "cdpo" or value["epsilon"] < 0.5:
                    assert _weights(policy) != sft, (seed, record["rate"], arm)


def _noise(clean: float, plain: dict[float, float], robust: dict[float, float], arm: str = "filter-cdpo") -> dict:
    """A noise table's aggregate with only the cells the claim reads: mean accuracy per (rate, arm)."""
    rates = [{"rate": 0.0, "arms": {"plain": {"accuracy_mean": clean}, arm: {"accuracy_mean": clean}}}]
    rates += [{"rate": rate, "arms": {"plain": {"accuracy_mean": plain[rate]}, arm: {"accuracy_mean": robust[rate]}}}
              for rate in sorted(plain)]
    return {"rates": rates}


def test_noise_claim_needs_the_robust_arm_near_clean_and_plain_dpo_falling(fidelity):
    claim = fidelity.noise_robust
    # clean 50 %: the robust arm at 49 / 48.5 % (within 2 points), plain DPO at 40 % flips 45 % (drops 5).
    assert claim({"noise": _noise(0.50, {0.2: 0.47, 0.4: 0.45}, {0.2: 0.49, 0.4: 0.485})}, "filter-cdpo") is True
    # The robust arm falls 3 points at 40 %: not within 2.
    assert claim({"noise": _noise(0.50, {0.2: 0.47, 0.4: 0.45}, {0.2: 0.49, 0.4: 0.47})}, "filter-cdpo") is False
    # ... and at 20 % only: every injected rate counts.
    assert claim({"noise": _noise(0.50, {0.2: 0.47, 0.4: 0.45}, {0.2: 0.47, 0.4: 0.49})}, "filter-cdpo") is False
    # Plain DPO loses only 1 point at the highest rate: no drop to be robust against.
    assert claim({"noise": _noise(0.50, {0.2: 0.50, 0.4: 0.49}, {0.2: 0.50, 0.4: 0.50})}, "filter-cdpo") is False
    # Not measured: no noise table, or not the arm the claim is about.
    assert claim({}, "filter-cdpo") is None
    assert claim({"noise": _noise(0.50, {0.2: 0.47, 0.4: 0.45}, {0.2: 0.49, 0.4: 0.49})}, "filter-rdpo") is None
    verdicts = {c.rule: c.check({"noise": _noise(0.5, {0.2: 0.47, 0.4: 0.45}, {0.2: 0.49, 0.4: 0.49}, "filter-rdpo")})
                for c in fidelity.CLAIMS}
    assert [v for rule, v in verdicts.items() if "rDPO" in rule] == [True]
    assert [v for rule, v in verdicts.items() if "cDPO" in rule] == [None]


def _gold(*accuracies: float) -> dict:
    return {"rounds": [{"accuracy_mean": a} for a in accuracies]}


def test_overoptimisation_claim_needs_the_single_model_to_fall_and_the_ensemble_to_end_higher(fidelity):
    claim = fidelity.ensemble_delays_overoptimisation
    assert claim({"rm-single": _gold(0.40, 0.50, 0.45, 0.41), "rm-ensemble": _gold(0.40, 0.48, 0.50, 0.49)}) is True
    # The single model never falls from its peak: no over-optimisation to delay.
    assert claim({"rm-single": _gold(0.40, 0.45, 0.50), "rm-ensemble": _gold(0.40, 0.48, 0.55)}) is False
    # The single model falls, but the ensemble ends lower still.
    assert claim({"rm-single": _gold(0.40, 0.50, 0.45), "rm-ensemble": _gold(0.40, 0.42, 0.44)}) is False
    # Peak at SFT (round 0), then a fall, ensemble higher at the end: over-optimised from the first round.
    assert claim({"rm-single": _gold(0.40, 0.35, 0.30), "rm-ensemble": _gold(0.40, 0.38, 0.39)}) is True
    assert claim({"rm-single": _gold(0.40, 0.50, 0.45), "rm-ensemble": {}}) is None


def _noise_seed(sft: float, plain: float, cdpo: float, estimate: float) -> dict:
    arm = {"loss": "sigmoid", "pairs": 10, "epsilon": None, "accuracy_stderr": 0.01, "gain_stderr": 0.02}
    return {"sft": {"accuracy": sft}, "reward_model": {"heldout_pairwise_accuracy": 0.6},
            "rates": [{"rate": 0.4, "true_flip_rate": 0.4, "estimated_flip_rate": estimate, "estimator": "calibrated",
                       "arms": {"plain": arm | {"accuracy": plain, "gain": plain - sft},
                                "filter-cdpo": arm | {"accuracy": cdpo, "gain": cdpo - sft, "epsilon": estimate,
                                                      "vs_plain": cdpo - plain}}}]}


def test_noise_and_overoptimisation_aggregates_across_seeds(fidelity):
    noise = fidelity.aggregate_noise({0: _noise_seed(0.40, 0.38, 0.44, 0.30), 1: _noise_seed(0.30, 0.26, 0.30, 0.40)})
    cell = noise["rates"][0]["arms"]["filter-cdpo"]
    assert cell["accuracy_mean"] == pytest.approx(0.37) and cell["accuracy_sd"] == pytest.approx(0.07 * math.sqrt(2))
    assert cell["gain_mean"] == pytest.approx(0.02) and cell["vs_plain_mean"] == pytest.approx(0.05)
    assert noise["rates"][0]["estimated_flip_rate_mean"] == pytest.approx(0.35)
    assert noise["sft_mean"] == pytest.approx(0.35)
    markdown = "\n".join(fidelity.render_noise(noise))
    assert "| 40 % | 0.400 | 0.350 ± 0.071 (calibrated) | filter s≤−t + cDPO (calibrated ε) | 10 | 0.350 | 37.0 ± 9.9 |" \
        in markdown

    def seed(accuracies: tuple[float, ...], kls: tuple[float, ...]) -> list[dict]:
        return [r | {"kl": kl, "reward": 0.1 * k, "rm_heldout_accuracy": 0.6}
                for k, (r, kl) in enumerate(zip(_rounds(*accuracies), kls, strict=True))]

    rm = fidelity.aggregate_rm({0: seed((0.40, 0.50, 0.44), (0.0, 1.0, 2.0)), 1: seed((0.30, 0.42, 0.36), (0.0, 3.0, 4.0))})
    assert rm["peak_round"] == 1 and rm["peak_kl"] == pytest.approx(2.0)
    assert rm["rounds"][2]["kl_mean"] == pytest.approx(3.0) and rm["rounds"][2]["reward_mean"] == pytest.approx(0.2)
    table = "\n".join(fidelity.render_overoptimisation({"rm-single": rm}))
    assert "| single reward model | 60.0 % | 1 (peak) | 2.000 ± 1.414 | 0.100 ± 0.000 | 46.0 ± 5.7 |" in table
