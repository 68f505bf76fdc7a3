"""Stage ``train-rm``: Bradley–Terry reward models and ensembles of them (pairs → model artifact).

The model, its loss and training, saving, loading and scoring are the reward-model recipe
(:mod:`prefloop.tasks.training.recipes.reward_model`); combining an ensemble's rewards is
:mod:`prefloop.tasks.common.ensembles`. This module holds the stage: its config, its spec, the split
into training and held-out pairs, the held-out evaluation and ``compute``. A single reward model
artifact is what ``evaluate`` takes as its ``reward_model`` input.

Ensembles (Coste et al. 2023; Eisenstein et al. 2023): k members that differ in the seed of the head
initialisation and of the data order, trained in one ``train-rm`` stage (``ensemble_size: k``).

Standardisation (ensembles): each member's rewards are standardised on a fixed reference set before
they are aggregated (:mod:`prefloop.tasks.common.ensembles`). The reference set is the distinct
(prompt, completion) texts of the held-out pairs (chosen and rejected; the training pairs' when
nothing is held out): every member scores them once, and μ_i, σ_i go into the ensemble's
``standardisation.json`` and the metric ``standardisation``. Only the members' rewards are read,
never the labels, so standardising on the held-out completions leaks no held-out preference.

Evaluation (in ``train-rm``'s metrics, on held-out prompts never trained on):

* pairwise accuracy  p = #(r_w > r_l) / n  (a tie counts as wrong; chance 0.5), SE sqrt(p(1 − p)/n);
* best-of-4 accuracy (RewardBench 2 style): for a prompt with one correct and three wrong answers,
  a hit when the correct answer out-scores all three (ties count as wrong; chance 0.25);
* misranking rates per |s| bin (metric ``heldout_misranking``): s = the members' mean raw margin
  r_m(y_w) − r_m(y_l) on each held-out pair, binned by |s|, with the share of pairs where s < 0 —
  what the filter stage calibrates its label-flip estimate with
  (:class:`prefloop.tasks.common.confidence.MisrankingCalibration`; valid when the held-out labels are clean).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, TRAIN_LOG
from prefloop.embedded.model import TinyLlamaConfig
from prefloop.embedded.tokenizer import build_tokenizer
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.lazy import deferred_import
from prefloop.stage import StageContext, StageOutput, done_total_callback
from prefloop.tasks.common.confidence import MISRANKING_METRIC, MisrankingCalibration
from prefloop.tasks.common.ensembles import Aggregation, MemberStandardisation, aggregate_rewards
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import TIMING_METRICS, train_log_table
from prefloop.tasks.training.configs import RewardModelTrainingConfig, TrainingStageConfig
from prefloop.tasks.training.distributed import run_info, train_with

if TYPE_CHECKING:
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    transformers = deferred_import("transformers")


# ----------------------------------------------------------------------------------------------
# Held-out accuracies (each with its formula)
# ----------------------------------------------------------------------------------------------
def pairwise_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> tuple[float, float, int]:
    """Share of pairs with r_w > r_l (ties count as wrong), its SE sqrt(p(1 − p)/n), and n."""
    chosen = np.asarray(chosen_rewards, dtype=np.float64)
    rejected = np.asarray(rejected_rewards, dtype=np.float64)
    if chosen.shape != rejected.shape:
        raise ValueError(f"pairwise_accuracy needs one chosen and one rejected reward per pair "
                         f"({chosen.shape} vs {rejected.shape})")
    n = len(chosen)
    if n == 0:
        raise UserError("pairwise accuracy of zero pairs is undefined: there are no held-out pairs")
    p = float((chosen > rejected).mean())
    return p, math.sqrt(p * (1 - p) / n), n


def best_of_n_accuracy(correct_rewards: Sequence[float], wrong_rewards: Sequence[Sequence[float]]) -> tuple[float, float, int]:
    """Share of sets where the correct answer out-scores every wrong one (ties count as wrong), SE, n.

    With three wrong answers per set this is RewardBench 2's best-of-4 accuracy (chance 0.25).
    """
    n = len(correct_rewards)
    if n == 0:
        raise UserError("best-of-n accuracy of zero sets is undefined")
    hits = [float(c > max(wrong)) for c, wrong in zip(correct_rewards, wrong_rewards, strict=True)]
    p = float(np.mean(hits))
    return p, math.sqrt(p * (1 - p) / n), n


@dataclass(frozen=True)
class BestOfNSet:
    """One prompt's evaluation set: a correct completion and n − 1 wrong ones."""

    prompt: str
    correct: str
    wrong: tuple[str, ...]


def best_of_n_sets(pairs: pa.Table, wrong_per_set: int = 3, seed: int = 0) -> list[BestOfNSet]:
    """Best-of-(1 + wrong_per_set) sets from preference pairs, one per prompt where possible.

    A prompt's completions are the distinct texts of its pairs with their scores; *correct* ones carry
    the prompt's top score, *wrong* ones a strictly lower score. A prompt with at least one correct
    and ``wrong_per_set`` wrong completions gives one set (the texts drawn with ``seed``). Pairs
    without scores give no sets.
    """
    texts: dict[str, dict[str, float]] = defaultdict(dict)
    columns = [pairs.column(c).to_pylist() for c in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")]
    for prompt, chosen, rejected, score_chosen, score_rejected in zip(*columns, strict=True):
        if score_chosen is None or score_rejected is None:
            continue
        texts[prompt].setdefault(chosen, score_chosen)
        texts[prompt].setdefault(rejected, score_rejected)
    rng = random.Random(seed)
    sets = []
    for prompt in sorted(texts):
        scored = texts[prompt]
        top = max(scored.values())
        correct = sorted(t for t, s in scored.items() if s == top)
        wrong = sorted(t for t, s in scored.items() if s < top)
        if correct and len(wrong) >= wrong_per_set:
            sets.append(BestOfNSet(prompt, rng.choice(correct), tuple(rng.sample(wrong, wrong_per_set))))
    return sets


# ----------------------------------------------------------------------------------------------
# Stage train-rm
# ----------------------------------------------------------------------------------------------
def heldout_prompt(prompt_key: str, fraction: float) -> bool:
    """Whether a prompt is held out from reward-model training, by a stable hash of its id (or text)."""
    unit = int(content_id("train-rm/heldout", prompt_key), 16) / 16 ** 16
    return unit < fraction


class TrainRewardModelConfig(TrainingStageConfig):
    training: RewardModelTrainingConfig = Field(default_factory=RewardModelTrainingConfig)
    model: TinyLlamaConfig = Field(
        default_factory=TinyLlamaConfig, description="architecture of a fresh model (unused with a policy input)")
    ensemble_size: int = Field(1, ge=1, le=16, description="k members, differing in head-init and data-order seed")
    seed: int = Field(0, description="member i uses seed + i for its head initialisation and data order")
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of prompts held out for evaluation (unused with a heldout input)")
    aggregation: Aggregation = Field("mean", description="ensemble aggregate reported as the headline accuracy")
    uncertainty_penalty: float = Field(0.5, ge=0.0, description="λ of uncertainty_weighted: mean − λ·variance")
    batch_size: int = Field(64, ge=1, description="scoring batch size of the held-out evaluation")


SPEC = stage_spec(
    "train-rm",
    version="1",
    config_model=TrainRewardModelConfig,
    description="Train a Bradley–Terry reward model (or an ensemble of k) on preference pairs; report held-out "
                "pairwise and best-of-4 accuracy.",
)


def _pair_triples(table: pa.Table) -> list[tuple[str, str, str]]:
    return list(zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                    table.column("rejected").to_pylist(), strict=True))


def _split_pairs(pairs: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    keys = [pid or prompt for pid, prompt in zip(pairs.column("prompt_id").to_pylist(),
                                                   pairs.column("prompt").to_pylist(), strict=True)]
    held = np.array([heldout_prompt(key, fraction) for key in keys], dtype=bool)
    return pairs.filter(pa.array(~held)), pairs.filter(pa.array(held))


def reference_completions(pairs: pa.Table) -> tuple[list[str], list[str]]:
    """The distinct (prompt, completion) texts of pairs, chosen and rejected, sorted: the reference set
    an ensemble's members are standardised on (each completion counted once however many pairs hold it)."""
    texts = {(prompt, completion) for prompt, chosen, rejected in _pair_triples(pairs) for completion in (chosen, rejected)}
    ordered = sorted(texts)
    return [prompt for prompt, _ in ordered], [completion for _, completion in ordered]


def fit_standardisation(models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, pairs: pa.Table,
                        reference: str, batch_size: int = 64) -> MemberStandardisation:
    """μ_i, σ_i of every member's rewards on the distinct completions of ``pairs``."""
    from prefloop.tasks.training.recipes.reward_model import score_texts

    prompts, completions = reference_completions(pairs)
    rewards = np.stack([score_texts(model, tokenizer, prompts, completions, batch_size) for model in models])
    return MemberStandardisation.fit(rewards, reference)


def evaluate_reward_models(models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                           heldout: pa.Table, aggregation: Aggregation = "mean", uncertainty_penalty: float = 0.5,
                           batch_size: int = 64, seed: int = 0,
                           standardisation: MemberStandardisation | None = None) -> dict[str, object]:
    """Held-out pairwise and best-of-4 accuracy (± SE) of each member and of the ensemble aggregates.

    The aggregates standardise each member with ``standardisation`` (μ_i, σ_i of a reference set);
    without it, on the distinct completions of ``heldout`` (what ``train-rm`` stores by default).

    The headline keys (``heldout_pairwise_accuracy``, ``heldout_best_of_4_accuracy`` and their
    ``_stderr``) are the single model's, or the ``aggregation``'s for an ensemble; ``heldout_by_scorer``
    holds every member and aggregate. The SE sqrt(p(1 − p)/n) treats pairs as independent: several
    pairs of one prompt share it, so with many pairs per prompt the SE is somewhat optimistic
    (benchmarks/reward_model.py uses one pair per prompt for that reason).
    """
    from prefloop.tasks.training.recipes.reward_model import score_texts

    metrics: dict[str, object] = {"heldout_pairs": heldout.num_rows}
    if heldout.num_rows == 0:
        return metrics | {"notes": ["no held-out pairs: raise heldout_fraction or pass a heldout input"]}
    prompts, chosen, rejected = (list(column) for column in zip(*_pair_triples(heldout), strict=True))
    sets = best_of_n_sets(heldout, wrong_per_set=3, seed=seed)
    set_prompts = [s.prompt for s in sets for _ in range(4)]
    set_texts = [text for s in sets for text in (s.correct, *s.wrong)]
    pair_rewards = np.stack([np.stack([score_texts(m, tokenizer, prompts, chosen, batch_size),
                                       score_texts(m, tokenizer, prompts, rejected, batch_size)]) for m in models])
    set_rewards = np.stack([score_texts(m, tokenizer, set_prompts, set_texts, batch_size) for m in models]) \
        if sets else None
    # The filter's strength s is the mean of the members' raw margins (label-rm's member rows): the same here.
    strength = (pair_rewards[:, 0] - pair_rewards[:, 1]).mean(axis=0)
    metrics[MISRANKING_METRIC] = MisrankingCalibration.fit(strength, len(models), "held-out pairs").to_dict()
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for index in range(len(models)):
        scorers[f"member_{index}"] = (pair_rewards[index], None if set_rewards is None else set_rewards[index])
    if len(models) > 1:
        if standardisation is None:
            standardisation = fit_standardisation(models, tokenizer, heldout, "held-out completions", batch_size)
        for name in ("mean", "min", "uncertainty_weighted"):
            combined = np.stack([aggregate_rewards(pair_rewards[:, side], name, uncertainty_penalty, standardisation)
                                 for side in (0, 1)])
            sets_combined = None if set_rewards is None else \
                aggregate_rewards(set_rewards, name, uncertainty_penalty, standardisation)
            scorers[name] = (combined, sets_combined)
    headline = aggregation if len(models) > 1 else "member_0"
    by_scorer: dict[str, dict[str, float]] = {}
    for name, (pair_scores, set_scores) in scorers.items():
        accuracy, stderr, _ = pairwise_accuracy(pair_scores[0], pair_scores[1])
        entry = {"pairwise_accuracy": accuracy, "pairwise_accuracy_stderr": stderr}
        if set_scores is not None:
            grouped = set_scores.reshape(len(sets), 4)
            hit, hit_stderr, _ = best_of_n_accuracy(grouped[:, 0], grouped[:, 1:])
            entry |= {"best_of_4_accuracy": hit, "best_of_4_accuracy_stderr": hit_stderr}
        by_scorer[name] = entry
    metrics |= {f"heldout_{key}": value for key, value in by_scorer[headline].items()}
    metrics["heldout_best_of_4_sets"] = len(sets)
    if not sets:
        metrics["notes"] = ["no best-of-4 sets: no held-out prompt has one top-scored and three lower-scored "
                            "completions among its pairs"]
    if len(models) > 1:
        metrics["heldout_by_scorer"] = by_scorer
    return metrics


def compute(ctx: StageContext) -> StageOutput:
    from prefloop.tasks.training.optim import num_steps_for
    from prefloop.tasks.training.recipes.reward_model import (
        build_reward_model,
        save_reward_models,
        train_reward_model,
    )

    config: TrainRewardModelConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    source = ctx.inputs["preferences"]
    if pairs.num_rows == 0:
        raise UserError(f"preferences {source} is empty: a reward model needs pairs to learn from. "
                         "Sample more completions per prompt, or relax the filter.")
    if ctx.has("heldout"):
        train, heldout = pairs, ctx.read("heldout", PREFERENCES)
    else:
        train, heldout = _split_pairs(pairs, config.heldout_fraction)
        if train.num_rows == 0:
            raise UserError(f"every pair of {source} fell into the held-out share ({config.heldout_fraction}); "
                             "lower heldout_fraction or pass a separate heldout input")
    policy_dir = ctx.model_dir("policy") if ctx.has("policy") else None
    tokenizer = (transformers.AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=False, local_files_only=True)
                 if policy_dir is not None else build_tokenizer())
    triples = _pair_triples(train)
    seeds = [config.seed + i for i in range(config.ensemble_size)]
    models, logs = [], []
    steps_per_member = num_steps_for(len(triples), config.training)
    with ctx.progress(steps_per_member * len(seeds), "steps") as advance:
        report = done_total_callback(advance)
        for index, seed in enumerate(seeds):
            model = build_reward_model(tokenizer, seed, policy_dir, config.model)
            member_config = config.training.model_copy(update={"seed": seed})
            offset = index * steps_per_member
            logs.append(train_with(train_reward_model, model, tokenizer, triples, member_config,
                                   distributed=member_config.distributed,
                                   progress=lambda done, total, offset=offset: report(offset + done, 0)))
            models.append(model)
    steps = _merged_log(logs)
    metrics: dict[str, object] = {"pairs": pairs.num_rows, "train_pairs": train.num_rows,
                                  "ensemble_size": len(models), "member_seeds": seeds,
                                  "initialised_from": "policy" if policy_dir is not None else "fresh",
                                  **run_info(config.training.distributed)}
    for index, log in enumerate(logs):
        prefix = "" if len(logs) == 1 else f"member_{index}_"
        metrics |= {f"{prefix}final_{k}": float(v) for k, v in log[-1].items()
                    if k not in TIMING_METRICS and k != "step"}
    standardisation = None
    if len(models) > 1:
        # Held-out completions when there are any: a fixed set, so a completion's standardised reward
        # never depends on what else a later call scores with it.
        reference, name = (heldout, "held-out completions") if heldout.num_rows else (train, "training completions")
        standardisation = fit_standardisation(models, tokenizer, reference, name, config.batch_size)
        metrics["standardisation"] = standardisation.to_dict()
    metrics |= evaluate_reward_models(models, tokenizer, heldout, config.aggregation, config.uncertainty_penalty,
                                      config.batch_size, config.seed, standardisation)
    files_dir = save_reward_models(models, tokenizer, seeds)
    if standardisation is not None:
        standardisation.write(files_dir)
    return StageOutput(files_dir=files_dir, extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)},
                       metrics=metrics)


def _merged_log(logs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """One step list; with several members each metric is prefixed ``member_<i>/``."""
    if len(logs) == 1:
        return logs[0]
    merged: dict[int, dict[str, float]] = defaultdict(dict)
    for index, log in enumerate(logs):
        for entry in log:
            merged[int(entry["step"])] |= {f"member_{index}/{k}": v for k, v in entry.items() if k != "step"}
    return [{"step": step, **values} for step, values in sorted(merged.items())]
