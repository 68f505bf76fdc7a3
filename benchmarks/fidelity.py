"""Which paper claims prefloop reproduces on the embedded default: one table over ≥ 3 seeds.

Each *row* is a loop config (a shipped config plus a few overrides) run with every seed in
``--seeds``; the seed changes the SFT warm start, the prompts and every sample. Per row and round the
table gives held-out greedy accuracy as mean ± standard deviation across seeds, and the paired gain
vs the row's own SFT model (same held-out prompts, d_i = correct_i − sft_i) per seed with its standard
error. Next to each claim: the paper, what it says, and whether this table reproduces its direction —
decided by the rule printed with it from the measured numbers, never by hand.

Rows (``--rows``, default all that are defined):

- ``bon-fixed`` — best-vs-worst pairs from n = 8 verified samples, DPO + NLL (Iterative RPO), the
  reference fixed at the SFT model (configs/demo.yaml's setting before this table chose ``previous_round``);
- ``bon-previous`` — the same with ``reference_policy: previous_round`` (iterative DPO: RLHFlow, SPIN;
  configs/demo.yaml as shipped);
- ``bon-previous-half-lr`` — the same at half the learning rate (5e-5): the third setting declared for
  choosing the demo's, before any result was seen;
- ``rso`` — statistical rejection sampling (configs/rso.yaml);
- ``mcts-dpo`` — MCTS step-level pairs trained with conservative DPO and the per-pair ε from the
  decision-time visit counts (configs/mcts_dpo.yaml, loss cdpo, ``label_flip_rate_source: confidence``);
- ``bon-previous-cdpo`` / ``cream`` — ``bon-previous`` trained by cDPO at its global ε = 0.1, and the same with
  CREAM's per-pair ε from the consistency of two rounds' rankings (``filter.consistency_confidence``, from round
  2); compared prompt by prompt after the last round (paired SE per seed), with the mean consistency and the ε
  trained with per round;
- ``noise`` — a second table: round 1 of ``bon-previous`` with 0 / 20 / 40 % of its pairs' labels swapped,
  trained by plain DPO (the loop's filter), and by cDPO (Mitchell 2023) and rDPO (Chowdhury et al. 2024)
  after a reward-model ensemble filter, ε = the filter's calibrated pre-action estimate
  (benchmarks/noise_robustness.py's :func:`noise_round`); accuracy and paired gain vs the seed's SFT;
- ``rm-single`` / ``rm-ensemble`` — a third table: ``bon-previous``'s loop with the rounds labeled by a
  reward model (loop setting ``reward_model``: train-rm from the SFT policy on clean verifier pairs of the
  SFT model's samples on prompts no round uses, members 1 or 3 with ``min`` of standardised rewards), 3
  rounds; per round the KL to the SFT policy, the RM's mean reward and the gold (verifier) accuracy: the
  over-optimisation curve of Coste et al. 2024.

Runs share whatever their configs share: every row of one seed uses the same SFT model and the same
round-0 evaluation, and rows whose round-1 sampling coincides share it (the store is content-addressed).
The noise rows are built with the loop's own stage calls and configs, so they find bon-previous's SFT model,
round-1 samples, pairs and round-0 evaluation in the store (``shared`` in the JSON records the ids and the
cache hits), and the noise rows' ensemble is rm-ensemble's labeling reward model (same train-rm config).
Everything lands in ``--store``, so an interrupted table resumes where it stopped and ``--report-only``
re-reads finished runs without computing anything.

``--quick`` runs every row on the smoke config (configs/smoke.yaml, tiny model, 1 round — the rm and CREAM rows 2 —,
2 seeds): it checks that each row's wiring runs end to end (``make test`` runs it, tests/test_fidelity.py);
each round's training moves the policy (QUICK), but its figures mean nothing (24 held-out prompts). About 55 s of
CPU time (one thread), the noise and rm rows included.

Writes ``--out``/fidelity.md, fidelity.json and fidelity.png. Figures vary by CPU (training floats
differ across machines): compare directions and gains across seeds, not single figures.

Over 400 lines: three tables (loop rows with their paired comparisons, noise robustness, over-optimisation) each
with its runner, aggregate across seeds, claim rule and rendering, which share the row configs and one seed-major
driver.

Examples:
    .venv/bin/python benchmarks/fidelity.py --rows bon-fixed bon-previous --seeds 0 1 2
    .venv/bin/python benchmarks/fidelity.py --report-only
    .venv/bin/python benchmarks/fidelity.py --quick --store /tmp/fidelity-quick --out /tmp/fidelity-quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    config: str  # shipped config, relative to the repository
    overrides: dict[str, Any] = field(default_factory=dict)
    # On the smoke config (--quick): the overrides that select this row's method at smoke size.
    quick_overrides: dict[str, Any] = field(default_factory=dict)


# --quick: the smoke config with a warm start just good enough that rounds build pairs, and training that moves
# the policy (tests/test_fidelity.py checks both). Measured on the smoke config as shipped: its SFT learns 64
# prompts by heart (loss 0.002) and they include every round prompt, so nearly all samples were right (21 of 24
# prompts all tied) and rounds built 0-5 pairs; its DPO step (lr 3e-6, batch 8: one step on so few pairs) left
# every policy at KL ≈ 0.001 (the estimate's noise) and greedy accuracy unchanged. 1024 SFT prompts in the same
# 500 steps give 29-54 % held-out, 7-24 pairs per round; training is the shipped rows' recipe (DPO + NLL, β 0.5)
# at a rate and passes that a few pairs can move (KL 0.16-2.4 to the reference per round) at no added time.
QUICK_LEARNING_RATE = 2e-4
QUICK: dict[str, Any] = {"rounds": 1, "sampling": {"n": 8}, "sft_prompts": {"n_train": 1024}, "sft": {
    "model": {"hidden_size": 64, "intermediate_size": 128}, "training": {"max_steps": 500, "batch_size": 32}},
    "train": {"training": {"loss": "rpo", "nll_weight": 1.0, "beta": 0.5, "learning_rate": QUICK_LEARNING_RATE,
                           "batch_size": 8, "epochs": 4.0}}}

ROWS: dict[str, Row] = {row.name: row for row in (
    Row("bon-fixed", "best-of-n DPO, fixed reference (SFT)", "configs/demo.yaml",
        {"reference_policy": "fixed"}, {"reference_policy": "fixed"}),
    Row("bon-previous", "best-of-n DPO, previous-round reference", "configs/demo.yaml",
        {"reference_policy": "previous_round"}, {"reference_policy": "previous_round"}),
    # Declared before any result of it was seen: the third demo setting tried if previous_round alone does not
    # rise in every round on every seed (a smaller step per round: half the learning rate).
    Row("bon-previous-half-lr", "best-of-n DPO, previous-round reference, learning rate 5e-5", "configs/demo.yaml",
        {"reference_policy": "previous_round", "train": {"training": {"learning_rate": 0.00005}}},
        {"reference_policy": "previous_round", "train": {"training": {"learning_rate": QUICK_LEARNING_RATE / 2}}}),
    Row("rso", "RSO (rejection-sampled pairs)", "configs/rso.yaml", {},
        {"sampling": {"n": 8}, "construction": {"method": "rso", "rso": {"num_accepted": 4}}}),
    Row("mcts-dpo", "MCTS-DPO (cDPO, per-pair ε at decision time)", "configs/mcts_dpo.yaml",
        {"train": {"label_flip_rate_source": "confidence", "training": {"loss": "cdpo"}}},
        {"reference_policy": "previous_round", "construction": {"method": "mcts"},
         "mcts": {"max_prompts": 8, "simulations": 2, "root_simulations": 4, "max_depth": 3, "lookahead_depth": 3,
                  "max_step_tokens": 8,
                  # As configs/mcts_dpo.yaml: the self-evaluation template alone overflows the smoke model's
                  # 64-token window, so every tree stopped there (trees_context_window) and built no pair.
                  "self_eval_weight": 0.0},
         "train": {"label_flip_rate_source": "confidence", "training": {"loss": "cdpo"}}}),
    # CREAM and the same rounds without it, declared with their rule before either ran. Both train with the cdpo
    # loss (no NLL term: rpo takes no ε), which reads each pair's ε from its confidence: without consistency the
    # verifier's pairs carry none, so every pair takes the loss's global ε, 0.1 by default (ALGORITHMS.md §5) —
    # the rows compare a fixed ε with CREAM's per-pair one. Round 1 has no previous policy, so CREAM's round 1
    # is this baseline's (the same ids, computed once); the rows differ from round 2 on.
    Row("bon-previous-cdpo", "best-of-n cDPO (global ε = 0.1), previous-round reference", "configs/demo.yaml",
        {"reference_policy": "previous_round", "train": {"training": {"loss": "cdpo"}}},
        {"rounds": 2, "reference_policy": "previous_round", "train": {"training": {"loss": "cdpo"}}}),
    Row("cream", "the same with CREAM's per-pair ε = min((1 − τ)/2, ½), τ the prompt's rank agreement", "configs/demo.yaml",
        {"reference_policy": "previous_round", "filter": {"consistency_confidence": True},
         "train": {"training": {"loss": "cdpo"}}},
        {"rounds": 2, "reference_policy": "previous_round", "filter": {"consistency_confidence": True},
         "train": {"training": {"loss": "cdpo"}}}),
)}


# ---------------------------------------------------------------------------------------------
# Noise robustness (round 1 under injected flips) and reward-model over-optimisation (RM-labeled rounds)
# ---------------------------------------------------------------------------------------------
# Both start from bon-previous's config (configs/demo.yaml as shipped): the same SFT model and round-1 samples.
BASE_ROW = "bon-previous"
NOISE = "noise"
NOISE_RATES = (0.0, 0.2, 0.4)
NOISE_ARMS = ("plain", "filter-cdpo", "filter-rdpo")
NOISE_TOLERANCE = 0.02  # "within 2 points of clean"
# The reward models (the noise benchmark's ensemble and the rm rows'): trained by train-rm from the SFT policy on
# the SFT model's clean verifier pairs of prompts no round samples. Full size: the settings the noise benchmark
# used (lr 1e-3, 2 epochs, a quarter held out); quick: a few steps, wiring only.
RM_PROMPTS, QUICK_RM_PROMPTS = 1024, 48
RM_TRAINING, QUICK_RM_TRAINING = {"learning_rate": 1e-3, "epochs": 2.0}, {"max_steps": 20, "batch_size": 16,
                                                                          "learning_rate": 3e-4}
RM_HELDOUT_FRACTION = 0.25
RM_ROUNDS, QUICK_RM_ROUNDS = 3, 2


@dataclass(frozen=True)
class RewardModelRow:
    name: str
    label: str
    members: int
    aggregate: str


# The ensemble aggregates by min over standardised members (worst-case optimisation, Coste et al. 2024): it has
# no weight to choose (uncertainty_weighted's λ would have to be tuned, which this table may not do), and it is
# the aggregate whose meaning depends most on standardisation (unstandardised, min picks the member with the
# lowest Bradley–Terry offset), so the row measures the issue-17 fix too.
RM_ROWS: dict[str, RewardModelRow] = {row.name: row for row in (
    RewardModelRow("rm-single", "single reward model", 1, "mean"),
    RewardModelRow("rm-ensemble", "ensemble of 3, min of standardised rewards", 3, "min"),
)}


def reward_model_setting(members: int, aggregate: str, quick: bool) -> dict[str, Any]:
    """The loop setting ``reward_model`` of an rm row, without its ``preferences`` (made per seed)."""
    return {"members": members, "aggregate": aggregate, "heldout_fraction": RM_HELDOUT_FRACTION,
            "training": QUICK_RM_TRAINING if quick else RM_TRAINING}


def _noise_module() -> Any:
    """benchmarks/noise_robustness.py (benchmarks/ is not a package)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    import noise_robustness

    return noise_robustness


def run_noise(seed: int, store: str, quick: bool, compute: bool) -> dict[str, Any] | None:
    """Round 1 of bon-previous's config for ``seed`` under 0 / 20 / 40 % injected flips, with the
    noise benchmark's functions (:func:`noise_robustness.noise_round`); the ensemble is rm-ensemble's
    reward model. Also records the ids it shares with the loop rows. None when not finished and not computing."""
    from prefloop.config import RewardModelSetting
    from prefloop.orchestration import StageNotInStore

    noise = _noise_module()
    config = row_config(ROWS[BASE_ROW], seed, quick, name="noise")
    setting = RewardModelSetting(preferences="made per seed", **reward_model_setting(3, RM_ROWS["rm-ensemble"].aggregate,
                                                                                     quick))
    stages = noise.Stages(store, compute=compute)
    started = time.perf_counter()
    try:
        result = noise.noise_round(config, stages, noise.NoiseSettings(NOISE_RATES, NOISE_ARMS), setting.train_config(seed),
                                   QUICK_RM_PROMPTS if quick else RM_PROMPTS)
    except StageNotInStore:
        if compute:
            raise
        return None
    computed = [r.stage for r in stages.results if not r.cached]
    if computed:
        print(f"[fidelity] {NOISE} seed {seed}: done in {time.perf_counter() - started:.0f} s", flush=True)
    by_name = {r.name: r for r in stages.results}
    result["shared"] = {key: {"id": by_name[f"{config.name}/{name}"].output,
                              "cached": by_name[f"{config.name}/{name}"].cached}
                        for key, name in (("sft", "round-0/policy"), ("round-1 samples", "round-1/samples"),
                                          ("reward model", "reward-model"))}
    return result


def run_rm_row(row: RewardModelRow, seed: int, store: str, quick: bool, compute: bool) -> list[dict[str, Any]] | None:
    """Per round of one (rm row, seed): gold (verifier) accuracy ± SE and gain vs SFT, KL to the SFT
    policy, mean reward under the labeling reward model. The loop is bon-previous's config with the loop
    setting ``reward_model`` (train-rm on the clean pairs of :func:`noise_robustness.reward_model_pairs`)."""
    from prefloop.config import LoopConfig
    from prefloop.orchestration import StageNotInStore

    noise = _noise_module()
    base = row_config(ROWS[BASE_ROW], seed, quick, name="noise")
    stages = noise.Stages(store, compute=compute)
    try:
        pairs = noise.reward_model_pairs(base, stages, noise.starting_point(base, stages),
                                         QUICK_RM_PROMPTS if quick else RM_PROMPTS)
    except StageNotInStore:
        if compute:
            raise
        return None
    data = row_data(ROWS[BASE_ROW], quick) | {
        "seed": seed, "name": f"fidelity-{row.name}-seed{seed}", "rounds": QUICK_RM_ROUNDS if quick else RM_ROUNDS,
        "reward_model": reward_model_setting(row.members, row.aggregate, quick) | {"preferences": pairs.output}}
    summary = _loop(LoopConfig.model_validate(data), row.name, seed, store, compute)
    if summary is None:
        return None
    trained = next(s for s in summary.rounds[0].stages if s.stage == "train-rm")
    rounds = []
    for summary_round in summary.rounds:
        values = _round_values(store, summary_round)
        metrics = values.pop("metrics")
        # KL to the SFT policy: kl_to_start where the round's reference is another policy, else the reference is SFT.
        kl = metrics.get("kl_to_start") or metrics.get("kl_to_reference")
        reward = metrics.get("mean_reward") or {}
        rounds.append(values | {"kl": 0.0 if summary_round.round == 0 else (kl or {}).get("value"),
                                "reward": reward.get("value"), "reward_stderr": reward.get("stderr"),
                                "reward_model": trained.output,
                                "rm_heldout_accuracy": trained.metrics.get("heldout_pairwise_accuracy")})
    return rounds


def aggregate_noise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Across seeds, per flip rate and arm: accuracy and gain vs SFT mean ± sd, the per-seed gains ± paired
    SE and differences to plain DPO; per flip rate the true rate and the filter's ε̂ mean ± sd."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    rates = []
    for index, record in enumerate(first["rates"]):
        at = {s: per_seed[s]["rates"][index] for s in seeds}
        estimates = [at[s]["estimated_flip_rate"] for s in seeds if at[s]["estimated_flip_rate"] is not None]
        arms = {}
        for arm in record["arms"]:
            values = {s: at[s]["arms"][arm] for s in seeds}
            accuracy_mean, accuracy_sd = _mean_sd([v["accuracy"] for v in values.values()])
            gain_mean, gain_sd = _mean_sd([v["gain"] for v in values.values()])
            versus = [v["vs_plain"] for v in values.values() if v.get("vs_plain") is not None]
            arms[arm] = {"accuracy_mean": accuracy_mean, "accuracy_sd": accuracy_sd, "gain_mean": gain_mean,
                         "gain_sd": gain_sd, "vs_plain_mean": _mean_sd(versus)[0] if versus else None,
                         "per_seed": values}
        rates.append({"rate": record["rate"],
                      "true_flip_rate_mean": statistics.fmean(at[s]["true_flip_rate"] for s in seeds),
                      "estimated_flip_rate_mean": _mean_sd(estimates)[0] if estimates else None,
                      "estimated_flip_rate_sd": _mean_sd(estimates)[1] if estimates else None,
                      "estimators": sorted({str(at[s]["estimator"]) for s in seeds}), "arms": arms})
    sft_mean, sft_sd = _mean_sd([per_seed[s]["sft"]["accuracy"] for s in seeds])
    rm = [per_seed[s]["reward_model"]["heldout_pairwise_accuracy"] for s in seeds]
    return {"seeds": seeds, "sft_mean": sft_mean, "sft_sd": sft_sd, "rates": rates,
            "rm_heldout_accuracy_mean": _mean_sd([a for a in rm if a is not None] or [math.nan])[0],
            "shared": {s: per_seed[s].get("shared") for s in seeds}}


def aggregate_rm(per_seed: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """:func:`aggregate` plus, per round, the KL to SFT and the mean reward (mean ± sd across seeds), and
    where the mean gold accuracy peaks (round and KL)."""
    result = aggregate(per_seed)
    for index, summary in enumerate(result["rounds"]):
        for key in ("kl", "reward"):
            values = [per_seed[s][index][key] for s in result["seeds"] if per_seed[s][index][key] is not None]
            summary[f"{key}_mean"], summary[f"{key}_sd"] = _mean_sd(values) if values else (None, None)
    peak = max(range(len(result["rounds"])), key=lambda k: result["rounds"][k]["accuracy_mean"])
    accuracies = [per_seed[s][0]["rm_heldout_accuracy"] for s in result["seeds"]]
    result |= {"peak_round": peak, "peak_kl": result["rounds"][peak]["kl_mean"],
               "rm_heldout_accuracy_mean": _mean_sd([a for a in accuracies if a is not None] or [math.nan])[0]}
    return result


@dataclass(frozen=True)
class Claim:
    paper: str
    says: str
    rule: str  # how "reproduced" is decided from the table, printed next to the verdict
    check: Callable[[dict[str, dict]], bool | None]


def _final(results: dict[str, dict], row: str) -> float | None:
    """A row's mean accuracy after its last round (None when the row was not run)."""
    rounds = results.get(row, {}).get("rounds")
    return rounds[-1]["accuracy_mean"] if rounds else None


def _sft(results: dict[str, dict]) -> float | None:
    for name, row in results.items():
        if name in ROWS and row.get("rounds"):
            return row["rounds"][0]["accuracy_mean"]
    return None


def noise_robust(results: dict[str, dict], arm: str, tolerance: float = NOISE_TOLERANCE) -> bool | None:
    """Filtering + robust loss stays within ``tolerance`` of clean while plain DPO drops: mean accuracy of
    ``arm`` ≥ clean − tolerance at every injected rate, and plain DPO's at the highest rate < clean − tolerance,
    clean = plain DPO at 0 % flips. None when those cells were not measured."""
    rates = {record["rate"]: record["arms"] for record in (results.get(NOISE) or {}).get("rates", [])}
    injected = sorted(rate for rate in rates if rate > 0)
    if "plain" not in rates.get(0.0, {}) or not injected or "plain" not in rates[injected[-1]] \
            or any(arm not in rates[rate] for rate in injected):
        return None
    clean = rates[0.0]["plain"]["accuracy_mean"]
    holds = all(rates[rate][arm]["accuracy_mean"] >= clean - tolerance for rate in injected)
    return holds and rates[injected[-1]]["plain"]["accuracy_mean"] < clean - tolerance


def ensemble_delays_overoptimisation(results: dict[str, dict]) -> bool | None:
    """The single reward model over-optimises — its mean gold accuracy peaks before the last round and is
    lower at the last — and the ensemble's mean gold accuracy at the last round is higher than the single's."""
    single, ensemble = results.get("rm-single") or {}, results.get("rm-ensemble") or {}
    if not single.get("rounds") or not ensemble.get("rounds"):
        return None
    gold = [r["accuracy_mean"] for r in single["rounds"]]
    peak = max(range(len(gold)), key=gold.__getitem__)
    return gold[-1] < gold[peak] and ensemble["rounds"][-1]["accuracy_mean"] > gold[-1]


def _greater(*values: float | None) -> bool | None:
    if any(v is None for v in values):
        return None
    return all(a > b for a, b in zip(values, values[1:], strict=False))


CLAIMS = (
    Claim("MCTS-DPO (Xie et al. 2024)", "step-level MCTS pairs beat instance-level best-of-n pairs, both beat SFT",
          "final-round mean accuracy: mcts-dpo > bon-fixed > SFT",
          lambda r: _greater(_final(r, "mcts-dpo"), _final(r, "bon-fixed"), _sft(r))),
    Claim("RSO (Liu et al. 2024)", "rejection-sampled pairs do at least as well as DPO's pairs on the same budget",
          "final-round mean accuracy: rso ≥ bon-fixed",
          lambda r: None if None in (_final(r, "rso"), _final(r, "bon-fixed"))
          else _final(r, "rso") >= _final(r, "bon-fixed")),
    Claim("Iterative DPO (Xiong et al. 2024; Tülu 3)", "each on-policy round improves on the last",
          "bon-previous: accuracy rises in every round for every seed",
          lambda r: r.get("bon-previous", {}).get("rises_every_round")),
    Claim("Iterative DPO, fixed reference", "each on-policy round improves on the last",
          "bon-fixed: accuracy rises in every round for every seed",
          lambda r: r.get("bon-fixed", {}).get("rises_every_round")),
    Claim("cDPO (Mitchell 2023) with an ensemble filter", "filtering + robust loss stays within 2 points of clean "
          "labels while plain DPO drops",
          "noise table, mean accuracy: filter + cDPO ≥ clean DPO − 2 points at 20 and 40 % flips, and plain DPO at "
          "40 % < clean DPO − 2 points", lambda r: noise_robust(r, "filter-cdpo")),
    Claim("rDPO (Chowdhury et al. 2024) with an ensemble filter", "filtering + robust loss stays within 2 points "
          "of clean labels while plain DPO drops",
          "noise table, mean accuracy: filter + rDPO ≥ clean DPO − 2 points at 20 and 40 % flips, and plain DPO at "
          "40 % < clean DPO − 2 points", lambda r: noise_robust(r, "filter-rdpo")),
    Claim("CREAM (Wang et al. 2024)", "consistency-regularised pairs (confidence from two rounds' rank agreement) "
          "improve on the same rounds without it", "final-round mean accuracy: cream > bon-previous-cdpo",
          lambda r: _greater(_final(r, "cream"), _final(r, "bon-previous-cdpo"))),
    Claim("Reward-model ensembles (Coste et al. 2024)", "ensembles delay over-optimisation of the reward model",
          "over-optimisation table, mean gold accuracy: rm-single peaks before its last round and falls after it, "
          "and rm-ensemble ends higher than rm-single", ensemble_delays_overoptimisation),
)


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def row_data(row: Row, quick: bool) -> dict[str, Any]:
    """A row's loop config as data (before the seed and name are set)."""
    from prefloop.config import read_yaml

    if quick:
        return deep_merge(deep_merge(read_yaml(REPO / "configs/smoke.yaml"), QUICK), row.quick_overrides)
    return deep_merge(read_yaml(REPO / row.config), row.overrides)


def row_config(row: Row, seed: int, quick: bool, name: str | None = None) -> Any:
    from prefloop.config import LoopConfig

    return LoopConfig.model_validate(row_data(row, quick) | {"seed": seed,
                                                             "name": f"fidelity-{name or row.name}-seed{seed}"})


def _loop(config: Any, label: str, seed: int, store: str, compute: bool) -> Any:
    """The finished loop's summary: looked up, else run (None when it is not finished and ``compute`` is off)."""
    from prefloop.flows.loop import lookup_loop, run_loop
    from prefloop.orchestration import StageNotInStore

    try:
        return lookup_loop(config, store)
    except StageNotInStore:
        if not compute:
            return None
        started = time.perf_counter()
        print(f"[fidelity] {label} seed {seed}: running", flush=True)
        summary = run_loop(config, store)
        print(f"[fidelity] {label} seed {seed}: done in {time.perf_counter() - started:.0f} s", flush=True)
        return summary


def _round_values(store: str, summary_round: Any) -> dict[str, Any]:
    """One round's evaluation: accuracy ± SE, the paired gain vs SFT ± SE (0 at round 0), and the metric rows."""
    from prefloop.storage import ArtifactStore

    target = ArtifactStore(store)
    evaluation = target.resolve(summary_round.metrics)
    values = {row_["metric"]: row_ for row_ in target.read_table(evaluation).to_pylist()}
    gain = values.get("accuracy_gain")
    stage_metrics = {result.stage: result.metrics for result in summary_round.stages}
    trained = stage_metrics.get("train", {})
    return {
        "round": summary_round.round,
        "accuracy": values["accuracy"]["value"], "accuracy_stderr": values["accuracy"]["stderr"],
        "gain": 0.0 if summary_round.round == 0 else (gain or {}).get("value"),
        "gain_stderr": 0.0 if summary_round.round == 0 else (gain or {}).get("stderr"),
        "pairs_kept": (values.get("pairs_kept") or {}).get("value"),
        "evaluation": str(evaluation),
        # CREAM: the mean confidence the filter gave the kept pairs, and the mean ε the loss trained with (per pair
        # from confidences, else the loss's global ε); None where the round has no such figure.
        "consistency_mean": stage_metrics.get("filter", {}).get("consistency_mean"),
        "epsilon_mean": trained.get("label_flip_rate_mean", trained.get("label_flip_rate")),
        "metrics": values,
    }


def run_row(row: Row, seed: int, store: str, quick: bool, compute: bool) -> list[dict[str, Any]] | None:
    """Per round of one (row, seed): accuracy ± SE and the paired gain vs SFT ± SE. None when the run is
    not finished and ``compute`` is off."""
    summary = _loop(row_config(row, seed, quick), row.name, seed, store, compute)
    if summary is None:
        return None
    rounds = [_round_values(store, summary_round) for summary_round in summary.rounds]
    for values in rounds:
        del values["metrics"]
    return rounds


# Rows compared prompt by prompt after their last round (row, against): the same seed's held-out prompts, so the
# difference's standard error is the paired one, much smaller than the spread of either row across seeds.
PAIRED = (("cream", "bon-previous-cdpo"),)


def paired_differences(results: dict[str, dict], store: str) -> list[dict[str, Any]]:
    """For each pair in :data:`PAIRED` that both ran: per shared seed, the last round's accuracy of ``row`` minus
    ``against``'s on the prompts both verified, ± its paired standard error; and the mean ± sd across seeds."""
    from prefloop.storage import ArtifactStore
    from prefloop.tasks.common.statistics import paired_gain

    target = ArtifactStore(store)

    def correct(evaluation: str) -> dict[str, bool]:
        return _noise_module().correct_by_prompt(target, target.resolve(evaluation))

    compared = []
    for row, against in PAIRED:
        mine, theirs = results.get(row, {}).get("rounds"), results.get(against, {}).get("rounds")
        if not mine or not theirs or len(mine) != len(theirs):
            continue
        per_seed = {}
        for seed in sorted(set(mine[-1]["per_seed"]) & set(theirs[-1]["per_seed"])):
            difference, stderr, prompts = paired_gain(correct(mine[-1]["per_seed"][seed]["evaluation"]),
                                                      correct(theirs[-1]["per_seed"][seed]["evaluation"]))
            per_seed[seed] = {"difference": difference, "stderr": stderr, "prompts": prompts}
        if per_seed:
            mean, sd = _mean_sd([v["difference"] for v in per_seed.values()])
            compared.append({"row": row, "against": against, "round": len(mine) - 1, "per_seed": per_seed,
                             "difference_mean": mean, "difference_sd": sd,
                             "confidences": {name: _confidences(results[name]) for name in (row, against)}})
    return compared


def _confidences(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per trained round, across seeds: the mean consistency the filter gave the kept pairs, the mean ε trained with."""
    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.fmean(present) if present else None

    return [{"round": r["round"],
             "consistency_mean": mean([v.get("consistency_mean") for v in r["per_seed"].values()]),
             "epsilon_mean": mean([v.get("epsilon_mean") for v in r["per_seed"].values()])}
            for r in result["rounds"][1:]]


def render_paired(compared: list[dict[str, Any]]) -> list[str]:
    if not compared:
        return []
    lines = ["Paired after the last round (the same seed's held-out prompts): accuracy of the row minus the other's, "
             "mean ± sd across seeds; per seed ± paired SE.", "",
             "| row | against | after round | difference | per seed: difference ± SE |", "|---|---|---|---|---|"]
    for c in compared:
        per_seed = ", ".join(f"{_pct(v['difference'], None, True)} ± {_pct(v['stderr'])}" for v in c["per_seed"].values())
        lines.append(f"| {ROWS[c['row']].label} | {ROWS[c['against']].label} | {c['round']} | "
                     f"{_pct(c['difference_mean'], c['difference_sd'], True)} | {per_seed} |")
    for c in compared:
        lines += ["", "Per round, mean across seeds: the consistency C the filter gave the kept pairs and the ε the loss "
                  "trained with.", "", "| row | " + " | ".join(f"round {r['round']}: C / ε"
                                                               for r in c["confidences"][c["row"]]) + " |",
                  "|---|" + "---|" * len(c["confidences"][c["row"]])]
        for name in (c["row"], c["against"]):
            cells = [f"{'–' if r['consistency_mean'] is None else format(r['consistency_mean'], '.2f')} / "
                     f"{'–' if r['epsilon_mean'] is None else format(r['epsilon_mean'], '.2f')}"
                     for r in c["confidences"][name]]
            lines.append(f"| {ROWS[name].label} | " + " | ".join(cells) + " |")
    return lines


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(per_seed: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Across seeds, per round: accuracy and gain mean ± sd, the per-seed gains ± SE, and whether every
    seed rose in every round."""
    seeds = sorted(per_seed)
    count = min(len(per_seed[s]) for s in seeds)
    rounds = []
    for index in range(count):
        accuracies = [per_seed[s][index]["accuracy"] for s in seeds]
        gains = [per_seed[s][index]["gain"] for s in seeds]
        accuracy_mean, accuracy_sd = _mean_sd(accuracies)
        gain_mean, gain_sd = _mean_sd([g for g in gains if g is not None] or [math.nan])
        rounds.append({"round": index, "accuracy_mean": accuracy_mean, "accuracy_sd": accuracy_sd,
                       "gain_mean": gain_mean, "gain_sd": gain_sd,
                       "per_seed": {s: per_seed[s][index] for s in seeds}})
    rises = {s: all(b["accuracy"] > a["accuracy"] for a, b in zip(per_seed[s], per_seed[s][1:], strict=False))
             for s in seeds}
    return {"seeds": seeds, "rounds": rounds, "rises_per_seed": rises, "rises_every_round": all(rises.values())}


def _pct(value: float | None, sd: float | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text + (f" ± {100 * sd:.1f}" if sd is not None else "")


def render_markdown(results: dict[str, dict], seeds: list[int], quick: bool, machine: str,
                    paired: list[dict[str, Any]] | None = None) -> str:
    lines = [f"Held-out greedy accuracy (%), mean ± sd across seeds {seeds}"
             + (" — QUICK (smoke config: wiring only, numbers meaningless)" if quick else "")
             + f"; {machine}. Gain: paired vs the seed's SFT model on the same prompts, mean ± sd across seeds;"
             " per seed: gain ± paired SE.", ""]
    loop_rows = {name: result for name, result in results.items() if name in ROWS}
    count = max((len(r["rounds"]) for r in loop_rows.values() if r.get("rounds")), default=1)
    header = "| row | " + " | ".join(["SFT"] + [f"round {k}" for k in range(1, count)]) \
        + " | gain after last round | per seed: gain ± SE | rises every round (per seed) |"
    lines += [header, "|" + "---|" * (count + 4)]
    for name, result in loop_rows.items():
        if not result.get("rounds"):
            lines.append(f"| {ROWS[name].label} | " + " | ".join(["not run"] * count) + " | – | – | – |")
            continue
        cells = [_pct(r["accuracy_mean"], r["accuracy_sd"]) for r in result["rounds"]]
        cells += ["–"] * (count - len(cells))
        last = result["rounds"][-1]
        per_seed = ", ".join(f"{_pct(v['gain'], None, True)} ± {_pct(v['gain_stderr'])}"
                             for v in last["per_seed"].values())
        rises = ", ".join(f"seed {s}: {'yes' if ok else 'no'}" for s, ok in result["rises_per_seed"].items())
        lines.append(f"| {ROWS[name].label} | " + " | ".join(cells)
                     + f" | {_pct(last['gain_mean'], last['gain_sd'], True)} | {per_seed} | {rises} |")
    if paired:
        lines += ["", *render_paired(paired)]
    if NOISE in results:
        lines += ["", *render_noise(results[NOISE])]
    if any(name in results for name in RM_ROWS):
        lines += ["", *render_overoptimisation({name: results[name] for name in RM_ROWS if name in results})]
    lines += ["", "| paper | claim | rule (from this table) | reproduced? |", "|---|---|---|---|"]
    for claim in CLAIMS:
        verdict = claim.check(results)
        lines.append(f"| {claim.paper} | {claim.says} | {claim.rule} | "
                     f"{'not measured' if verdict is None else 'yes' if verdict else 'no'} |")
    return "\n".join(lines) + "\n"


def _per_seed_gains(per_seed: dict[Any, dict[str, Any]]) -> str:
    return ", ".join(f"{_pct(v['gain'], None, True)} ± {_pct(v['gain_stderr'])}" for v in per_seed.values())


def render_noise(noise: dict[str, Any]) -> list[str]:
    """The noise-robustness table: one line per flip rate and arm."""
    if not noise:
        return ["Noise robustness: not run."]
    lines = [f"Noise robustness: round 1 of {BASE_ROW} with chosen/rejected swapped on a seeded share of its pairs; "
             f"SFT {_pct(noise['sft_mean'], noise['sft_sd'])} %; reward-model ensemble held-out pairwise accuracy "
             f"{_pct(noise['rm_heldout_accuracy_mean'])} %. ε̂: the filter's calibrated estimate before it acts "
             "(mean ± sd); ε: what the loss trained with (mean across seeds). Accuracy (%) mean ± sd across seeds; "
             "gain vs the seed's SFT: mean ± sd, per seed ± paired SE.", "",
             "| flips | true flip rate | ε̂ (estimator) | arm | pairs | ε | accuracy | gain vs SFT | per seed: gain ± SE "
             "| vs plain DPO |", "|" + "---|" * 10]
    noise_module_arms = _noise_module().ARMS
    for record in noise["rates"]:
        estimate = record["estimated_flip_rate_mean"]
        estimated = "–" if estimate is None else (f"{estimate:.3f}" + (f" ± {record['estimated_flip_rate_sd']:.3f}"
                                                                       if record["estimated_flip_rate_sd"] is not None else ""))
        for arm, value in record["arms"].items():
            per_seed = list(value["per_seed"].values())
            epsilons = [v["epsilon"] for v in per_seed if v.get("epsilon") is not None]
            pairs = statistics.fmean(v["pairs"] for v in per_seed)
            epsilon = f"{statistics.fmean(epsilons):.3f}" if epsilons else "–"
            lines.append(f"| {100 * record['rate']:.0f} % | {record['true_flip_rate_mean']:.3f} | {estimated} "
                         f"({', '.join(record['estimators'])}) | {noise_module_arms[arm][0]} | {pairs:.0f} | {epsilon} | "
                         f"{_pct(value['accuracy_mean'], value['accuracy_sd'])} | "
                         f"{_pct(value['gain_mean'], value['gain_sd'], True)} | {_per_seed_gains(value['per_seed'])} | "
                         f"{_pct(value['vs_plain_mean'], None, True)} |")
    return lines


def render_overoptimisation(rows: dict[str, dict]) -> list[str]:
    """The over-optimisation table: per rm row and round, KL to SFT, mean RM reward and gold accuracy."""
    lines = ["Reward-model over-optimisation: RM-labeled rounds of " + BASE_ROW + "'s config; the RM (train-rm, from "
             "the SFT policy) learned from clean verifier pairs of prompts no round samples. KL: to the SFT policy, "
             "nats per completion; RM reward: the evaluation's mean_reward of the held-out greedy completions under the "
             "labeling RM (the single model's raw reward, an ensemble's combination of standardised member rewards: "
             "the scales differ, compare each row with its own round 0); "
             "gold: verifier accuracy (%). Mean ± sd across seeds.", "",
             "| row | RM held-out pair accuracy | round | KL to SFT | RM reward | gold accuracy | gain vs SFT | "
             "per seed: gain ± SE |", "|" + "---|" * 8]
    for name, result in rows.items():
        if not result.get("rounds"):
            lines.append(f"| {RM_ROWS[name].label} | – | not run | – | – | – | – | – |")
            continue
        for summary in result["rounds"]:
            reward = "–" if summary["reward_mean"] is None else \
                f"{summary['reward_mean']:.3f}" + (f" ± {summary['reward_sd']:.3f}" if summary["reward_sd"] is not None else "")
            kl = "–" if summary["kl_mean"] is None else \
                f"{summary['kl_mean']:.3f}" + (f" ± {summary['kl_sd']:.3f}" if summary["kl_sd"] is not None else "")
            peak = " (peak)" if summary["round"] == result["peak_round"] else ""
            lines.append(f"| {RM_ROWS[name].label} | {_pct(result['rm_heldout_accuracy_mean'])} % | "
                         f"{summary['round']}{peak} | {kl} | {reward} | "
                         f"{_pct(summary['accuracy_mean'], summary['accuracy_sd'])} | "
                         f"{_pct(summary['gain_mean'], summary['gain_sd'], True)} | "
                         f"{_per_seed_gains(summary['per_seed'])} |")
    return lines


def plot(results: dict[str, dict], path: Path) -> None:
    """Three panels: accuracy by round of the loop rows; accuracy by flip rate of the noise arms; gold
    accuracy (and the RM's reward, dashed, right axis) against KL to SFT for the rm rows."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, (rounds_axis, noise_axis, kl_axis) = plt.subplots(1, 3, figsize=(17, 4))
    for name, result in results.items():
        if name not in ROWS or not result.get("rounds"):
            continue
        rounds = result["rounds"]
        rounds_axis.errorbar([r["round"] for r in rounds], [100 * r["accuracy_mean"] for r in rounds],
                             yerr=[100 * (r["accuracy_sd"] or 0.0) for r in rounds], label=ROWS[name].label,
                             capsize=3, marker="o")
    rounds_axis.set_xlabel("round (0 = SFT)")
    rounds_axis.set_ylabel("held-out accuracy, % (mean ± sd over seeds)")
    noise = results.get(NOISE) or {}
    for arm in NOISE_ARMS:
        cells = [(r["rate"], r["arms"][arm]) for r in noise.get("rates", []) if arm in r["arms"]]
        if cells:
            noise_axis.errorbar([100 * rate for rate, _ in cells], [100 * c["accuracy_mean"] for _, c in cells],
                                yerr=[100 * (c["accuracy_sd"] or 0.0) for _, c in cells], capsize=3, marker="o",
                                label=_noise_module().ARMS[arm][0])
    noise_axis.set_xlabel("injected label flips, % (round 1)")
    noise_axis.set_ylabel("held-out accuracy, %")
    reward_axis = kl_axis.twinx()
    for name in RM_ROWS:
        rounds = (results.get(name) or {}).get("rounds") or []
        kls = [r["kl_mean"] or 0.0 for r in rounds]
        if rounds:
            line = kl_axis.errorbar(kls, [100 * r["accuracy_mean"] for r in rounds], marker="o", capsize=3,
                                    yerr=[100 * (r["accuracy_sd"] or 0.0) for r in rounds],
                                    label=f"{RM_ROWS[name].label}: gold accuracy")
            reward_axis.plot(kls, [r["reward_mean"] for r in rounds], linestyle="--", marker="x",
                             color=line[0].get_color(), label=f"{RM_ROWS[name].label}: RM reward")
    kl_axis.set_xlabel("KL to the SFT policy (rounds 0, 1, 2, …)")
    kl_axis.set_ylabel("gold (verifier) accuracy, %")
    reward_axis.set_ylabel("mean RM reward (dashed)")
    for axis in (rounds_axis, noise_axis, kl_axis, reward_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6, loc="lower right" if axis is reward_axis else "best")
        elif axis is not reward_axis:  # a panel whose rows this run did not include
            axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes, color="grey")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = [*ROWS, NOISE, *RM_ROWS]
    parser.add_argument("--rows", nargs="+", choices=choices, default=choices)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--store", default=None, help="default .prefloop/fidelity (quick: .prefloop/fidelity-quick)")
    parser.add_argument("--out", default=None, help="where the table goes (default: the store's parent)")
    parser.add_argument("--quick", action="store_true", help="every row on the smoke config, 1 round, 2 seeds")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs, compute nothing")
    parser.add_argument("--machine", default="2-core CPU development machine",
                        help="named in the table: figures vary by CPU")
    arguments = parser.parse_args(argv)
    from prefloop.environment import apply_offline_defaults

    apply_offline_defaults()
    seeds = arguments.seeds or ([0, 1] if arguments.quick else [0, 1, 2])
    store = arguments.store or str(REPO / (".prefloop/fidelity-quick" if arguments.quick else ".prefloop/fidelity"))
    out = Path(arguments.out or Path(store).parent)
    out.mkdir(parents=True, exist_ok=True)
    compute = not arguments.report_only
    # Seed-major: every row of seed 0 first (they share its SFT model), so a partial table has whole seeds; the
    # noise rows after the loop rows (they reuse bon-previous's round 1), the rm rows last (rm-ensemble reuses
    # the noise rows' ensemble).
    per_row: dict[str, dict[int, Any]] = {name: {} for name in arguments.rows}
    for seed in seeds:
        for name in arguments.rows:
            if name in ROWS:
                finished = run_row(ROWS[name], seed, store, arguments.quick, compute)
            elif name == NOISE:
                finished = run_noise(seed, store, arguments.quick, compute)
            else:
                finished = run_rm_row(RM_ROWS[name], seed, store, arguments.quick, compute)
            if finished is not None:
                per_row[name][seed] = finished
    results: dict[str, dict] = {}
    for name in arguments.rows:
        finished = per_row[name]
        combine = aggregate if name in ROWS else aggregate_noise if name == NOISE else aggregate_rm
        results[name] = combine(finished) if finished else {}
    paired = paired_differences(results, store)
    markdown = render_markdown(results, seeds, arguments.quick, arguments.machine, paired)
    (out / "fidelity.md").write_text(markdown, encoding="utf-8")
    written = {"seeds": seeds, "quick": arguments.quick,
               "rows": {name: result for name, result in results.items() if name in ROWS},
               "noise": results.get(NOISE),
               "overoptimisation": {name: result for name, result in results.items() if name in RM_ROWS},
               "paired": paired, "claims": {c.rule: c.check(results) for c in CLAIMS}}
    (out / "fidelity.json").write_text(json.dumps(written, indent=1, default=str), encoding="utf-8")
    plot(results, out / "fidelity.png")
    print(markdown)
    print(f"written: {out / 'fidelity.md'}, fidelity.json, fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
