"""Stage ``construct``: turn scored samples into preference pairs.

Every method reads the same candidates — the samples of a prompt with their scores (a verifier's or
a reward model's) — and never pairs two candidates whose scores differ by ``min_margin`` or less:
ties make no pair (elsewhere, all-tied ratings make chosen == rejected).

Methods:

* ``best_vs_worst`` / ``best_vs_random`` — the best-of-n family (PF-PPO's best-worst and
  best-random, "Policy Filtration in RLHF to Fine-Tune LLM for Code Generation", 2024): chosen = the highest-scored sample, rejected = the lowest-scored one, or one
  drawn uniformly among those scored below the best by more than ``min_margin``. Several samples
  sharing the top (or bottom) score: one is drawn with the stage's seed.
* ``all_pairs`` — every pair of distinct completions whose scores differ by more than
  ``min_margin`` (the higher-scored one chosen), largest margins first, at most
  ``max_pairs_per_prompt`` per prompt.
* ``rso`` — statistical rejection sampling (Liu et al. 2024, "Statistical Rejection Sampling
  Improves Preference Optimization", ICLR; Algorithm 1): the N samples of a prompt, drawn from
  π_sft, are sub-sampled to M approximately distributed as the optimal policy
  π*(y|x) ∝ π_sft(y|x)·exp(r(x, y)/β), then paired; see :func:`rejection_sample` and
  :func:`pair_accepted`.

Bad candidates never reach a pair; each is recorded in the artifact's ``drops`` table with a named
reason: ``missing_label`` (no score from the chosen labeler), ``nonfinite_score`` (NaN/inf reward),
``empty_completion`` (the policy returned nothing), ``truncated_completion`` (finish reason
``length``: cut by max_new_tokens or the context window; kept only with ``drop_truncated: false``).

Sampled token ids (version 3): a pair carries its two samples' ``completion_token_ids`` as
``chosen_token_ids`` / ``rejected_token_ids`` with their ``tokenizer_fingerprint``, so training and the
reference score the sequences the policy sampled; a side without ids (imported samples) stays null and
is re-encoded from its text downstream.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from prefloop.datasets_spec import LABELS, PREFERENCES, SAMPLES, make_drops
from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext, StageInputError, StageOutput
from prefloop.tasks.common.ids import pair_id
from prefloop.tasks.registry import stage_spec

Method = Literal["best_vs_worst", "best_vs_random", "all_pairs", "rso"]


class RejectionSamplingConfig(BaseModel):
    """RSO's settings; defaults from the paper (β = 0.5, M = 8 accepted of N = 64 candidates)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(0.5, gt=0.0, description="β of π* ∝ π_sft·exp(r/β): small β = greedier toward reward")
    num_accepted: int = Field(8, ge=2, description="M: candidates accepted per prompt (N = the samples per prompt)")
    pairing: Literal["first_round", "tournament"] = Field(
        "first_round",
        description="first_round: the accepted are paired at random (a tournament's first round) and each pair "
        "labelled by reward; tournament: the accepted are ranked by reward and paired 1st-2nd, 3rd-4th, …",
    )


class ConstructConfig(StageConfig):
    method: Method = "best_vs_worst"
    labeler: str | None = Field(None, description="use this labeler's scores (None: the only labeler present)")
    min_margin: float = Field(0.0, ge=0.0, description="a pair needs score_chosen − score_rejected > this")
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="all_pairs: keep the largest margins (None: all)")
    drop_truncated: bool = Field(True, description="truncated samples (finish_reason 'length') never enter a pair")
    rso: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig, description="method 'rso' only")
    seed: int = 0


SPEC = stage_spec(
    "construct",
    version="3",
    config_model=ConstructConfig,
    output_table=PREFERENCES,
    description="Pair scored samples: best-of-n (best vs worst/random), all pairs above a margin, or RSO.",
)


@dataclass(frozen=True)
class Candidate:
    """One scored sample of a prompt."""

    sample_id: str
    prompt_id: str
    prompt: str
    completion: str
    score: float
    round: int | None = None
    policy_model_id: str | None = None
    token_ids: tuple[int, ...] | None = None  # the sampled ids of ``completion`` (None: unknown)
    tokenizer_fingerprint: str | None = None  # the tokenizer those ids belong to


# --- candidates -------------------------------------------------------------------------------------


def _scores(labels: pa.Table, labeler: str | None) -> dict[str, float]:
    """Each sample's score from ``labeler`` (the only labeler present when None); one label per sample."""
    names = sorted(set(labels.column("labeler").to_pylist()))
    if labeler is None:
        if len(names) > 1:
            raise StageInputError(f"labels come from several labelers {names}: set 'labeler' in the construct config")
        labeler = names[0] if names else None
    elif labeler not in names:
        raise StageInputError(f"no labels from labeler '{labeler}' (present: {names}); set 'labeler' to one of them")
    chosen = labels.filter(pc.equal(labels.column("labeler"), labeler)) if labeler else labels
    targets = chosen.column("target_id")
    if pc.count_distinct(targets).as_py() != len(targets):
        # Keeping one of several scores would pick a pair's winner by row order: refuse, as the filter does.
        counts = pc.value_counts(targets)
        twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise StageInputError(
            f"labels has several scores by labeler '{labeler}' for the same sample ({len(twice)} sample(s), e.g. "
            f"{twice[:3]}): keep one score per sample and labeler (give each labeler of an ensemble its own name, "
            "or drop the repeated rows) and run construct again")
    return dict(zip(targets.to_pylist(), chosen.column("score").to_pylist(), strict=True))


def candidate_drop_reason(completion: str | None, finish_reason: str | None, score: float | None,
                          drop_truncated: bool) -> str | None:
    """Why a sample cannot be a candidate, or None when it can."""
    if score is None:
        return "missing_label"
    if not math.isfinite(score):
        return "nonfinite_score"
    if completion is None or not completion.strip():
        return "empty_completion"
    if drop_truncated and finish_reason == "length":
        return "truncated_completion"
    return None


def collect_candidates(samples: pa.Table, scores: dict[str, float], drop_truncated: bool
                       ) -> tuple[dict[str, list[Candidate]], list[int], list[str]]:
    """Candidates per prompt (in sampling order), and the sample rows left out with their reasons."""
    # Tables conformed to SAMPLES have every column; a hand-made table may lack the optional ones (null).
    columns = {name: samples.column(name).to_pylist() if name in samples.column_names else [None] * samples.num_rows
               for name in ("sample_id", "prompt_id", "prompt", "completion", "finish_reason", "sample_index", "round",
                            "policy_model_id", "completion_token_ids", "tokenizer_fingerprint")}
    order = sorted(range(samples.num_rows),
                   key=lambda i: (columns["prompt_id"][i], columns["sample_index"][i] is None,
                                  columns["sample_index"][i] or 0, i))
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    dropped: list[int] = []
    reasons: list[str] = []
    for i in order:
        score = scores.get(columns["sample_id"][i])
        reason = candidate_drop_reason(columns["completion"][i], columns["finish_reason"][i], score, drop_truncated)
        if reason is not None:
            dropped.append(i)
            reasons.append(reason)
            continue
        by_prompt[columns["prompt_id"][i]].append(Candidate(
            sample_id=columns["sample_id"][i], prompt_id=columns["prompt_id"][i], prompt=columns["prompt"][i],
            completion=columns["completion"][i], score=float(score), round=columns["round"][i],  # type: ignore[arg-type]
            policy_model_id=columns["policy_model_id"][i],
            token_ids=None if (ids := columns["completion_token_ids"][i]) is None else tuple(ids),
            tokenizer_fingerprint=columns["tokenizer_fingerprint"][i],
        ))
    return dict(by_prompt), dropped, reasons


# --- the best-of-n family -------------------------------------------------------------------------------


def best_vs_worst(group: Sequence[Candidate], rng: random.Random, min_margin: float = 0.0
                  ) -> list[tuple[Candidate, Candidate]]:
    """[(best, worst)] when their scores differ by more than ``min_margin``, else no pair."""
    best = max(c.score for c in group)
    worst = min(c.score for c in group)
    if best - worst <= min_margin:
        return []
    chosen = rng.choice([c for c in group if c.score == best])
    rejected = rng.choice([c for c in group if c.score == worst])
    return [(chosen, rejected)]


def best_vs_random(group: Sequence[Candidate], rng: random.Random, min_margin: float = 0.0
                   ) -> list[tuple[Candidate, Candidate]]:
    """[(best, a uniformly drawn candidate scored more than ``min_margin`` below it)], or no pair."""
    best = max(c.score for c in group)
    worse = [c for c in group if best - c.score > min_margin]
    if not worse:
        return []
    chosen = rng.choice([c for c in group if c.score == best])
    return [(chosen, rng.choice(worse))]


def all_pairs(group: Sequence[Candidate], min_margin: float = 0.0, max_pairs: int | None = None
              ) -> list[tuple[Candidate, Candidate]]:
    """Every (higher, lower) pair of distinct completions with margin > ``min_margin``, largest first.

    Identical completions are one candidate (the first sampled), so no two pairs repeat a text pair.
    """
    distinct: dict[str, Candidate] = {}
    for candidate in group:
        distinct.setdefault(candidate.completion, candidate)
    unique = list(distinct.values())
    pairs = [(a, b) for a in unique for b in unique if a.score - b.score > min_margin]
    # Stable sort: equal margins keep sampling order, so the choice under the cap is deterministic.
    pairs.sort(key=lambda pair: pair[1].score - pair[0].score)
    return pairs[:max_pairs] if max_pairs is not None else pairs


# --- RSO ---------------------------------------------------------------------------------------------


def rejection_sample(rewards: Sequence[float], num_accepted: int, beta: float, rng: np.random.Generator
                     ) -> list[int]:
    """Indices of the accepted candidates, in acceptance order (RSO, Liu et al. 2024, Algorithm 1).

    Candidates y_1..y_N were drawn from π_sft; the target is π*(y) ∝ π_sft(y)·exp(r(y)/β). Repeat
    sweeps over the candidates still in the pool, in order: r_max = the largest reward in the pool;
    accept y with probability exp((r(y) − r_max)/β) (u ~ U[0, 1), accept if u < that), removing it from
    the pool; stop as soon as M = ``num_accepted`` are accepted. Since exp(r/β)/exp(r_max/β) ≤ 1 is
    π*/π_sft up to a constant, each acceptance is a rejection-sampling draw from π* (exact as N → ∞,
    the finite pool being sampled without replacement). The best candidate of the pool is always
    accepted in its sweep, so every sweep accepts at least one; with N < M all N end up accepted.
    """
    if beta <= 0:
        raise UserError(f"RSO needs beta > 0, got {beta}")
    if any(not math.isfinite(r) for r in rewards):
        raise UserError("RSO got a non-finite reward: drop such candidates first (reason 'nonfinite_score')")
    pool = list(range(len(rewards)))
    accepted: list[int] = []
    while pool and len(accepted) < num_accepted:
        max_reward = max(rewards[i] for i in pool)
        taken: list[int] = []
        for index in pool:
            if rng.uniform() >= math.exp((rewards[index] - max_reward) / beta):
                continue
            accepted.append(index)
            taken.append(index)
            if len(accepted) == num_accepted:
                break
        removed = set(taken)
        pool = [i for i in pool if i not in removed]
    return accepted


def pair_accepted(accepted: Sequence[Candidate], pairing: str, rng: random.Random, min_margin: float = 0.0
                  ) -> list[tuple[Candidate, Candidate]]:
    """Disjoint pairs from RSO's accepted set, each labelled by reward (higher = chosen).

    ``first_round`` (the paper's default): the accepted are paired at random — the first round of a
    single-elimination tournament — giving ⌊M/2⌋ pairs. ``tournament``: the accepted are ranked by
    reward (what a full tournament of pointwise rewards yields) and paired by adjacent rank (1st vs
    2nd, 3rd vs 4th, …). Either way a pair within ``min_margin`` (a tie) is left out.
    """
    if pairing == "first_round":
        order = list(accepted)
        rng.shuffle(order)
    elif pairing == "tournament":
        order = sorted(accepted, key=lambda c: -c.score)
    else:
        raise UserError(f"unknown RSO pairing '{pairing}'; valid: first_round, tournament")
    pairs = []
    for a, b in zip(order[0::2], order[1::2], strict=False):
        high, low = (a, b) if a.score >= b.score else (b, a)
        if high.score - low.score > min_margin:
            pairs.append((high, low))
    return pairs


# --- the stage ---------------------------------------------------------------------------------------


def pair_token_ids(chosen: Candidate, rejected: Candidate) -> tuple[list[int] | None, list[int] | None, str | None]:
    """(chosen ids, rejected ids, their tokenizer fingerprint) for a pair: each side's sampled ids where it has
    them; none at all when the two sides' ids come from different tokenizers (a pair names one tokenizer)."""
    known = [c.token_ids is not None and c.tokenizer_fingerprint is not None for c in (chosen, rejected)]
    fingerprints = {c.tokenizer_fingerprint for c, has in zip((chosen, rejected), known, strict=True) if has}
    if len(fingerprints) != 1:
        return None, None, None
    return (list(chosen.token_ids) if known[0] else None,  # type: ignore[arg-type]
            list(rejected.token_ids) if known[1] else None,  # type: ignore[arg-type]
            fingerprints.pop())


def _pair_row(chosen: Candidate, rejected: Candidate, method: str) -> dict:
    chosen_ids, rejected_ids, fingerprint = pair_token_ids(chosen, rejected)
    return {
        "pair_id": pair_id(chosen.prompt, chosen.completion, rejected.completion),
        "prompt_id": chosen.prompt_id,
        "prompt": chosen.prompt,
        "chosen": chosen.completion,
        "rejected": rejected.completion,
        "score_chosen": chosen.score,
        "score_rejected": rejected.score,
        "margin": chosen.score - rejected.score,
        "method": method,
        "confidence": None,
        "chosen_sample_id": chosen.sample_id,
        "rejected_sample_id": rejected.sample_id,
        "round": chosen.round,
        "policy_model_id": chosen.policy_model_id,
        "chosen_token_ids": chosen_ids,
        "rejected_token_ids": rejected_ids,
        "tokenizer_fingerprint": fingerprint,
    }


def build_pairs(by_prompt: dict[str, list[Candidate]], config: ConstructConfig) -> tuple[list[dict], dict]:
    """Pairs of every prompt (prompts in sorted order, so the seed gives the same pairs) and metrics."""
    rng = random.Random(config.seed)
    numpy_rng = np.random.default_rng(config.seed)
    rows: list[dict] = []
    without_pair = 0
    all_tied = 0
    accepted_total = 0
    candidates_total = 0
    for prompt_id in sorted(by_prompt):
        group = by_prompt[prompt_id]
        candidates_total += len(group)
        if max(c.score for c in group) - min(c.score for c in group) <= config.min_margin:
            all_tied += 1
        if config.method == "best_vs_worst":
            pairs = best_vs_worst(group, rng, config.min_margin)
        elif config.method == "best_vs_random":
            pairs = best_vs_random(group, rng, config.min_margin)
        elif config.method == "all_pairs":
            pairs = all_pairs(group, config.min_margin, config.max_pairs_per_prompt)
        else:
            indices = rejection_sample([c.score for c in group], config.rso.num_accepted, config.rso.beta, numpy_rng)
            accepted_total += len(indices)
            pairs = pair_accepted([group[i] for i in indices], config.rso.pairing, rng, config.min_margin)
        without_pair += not pairs
        rows.extend(_pair_row(chosen, rejected, config.method) for chosen, rejected in pairs)
    metrics = {"prompts": len(by_prompt), "candidates": candidates_total, "pairs_built": len(rows),
               "prompts_all_tied": all_tied, "prompts_without_pair": without_pair}
    if config.method == "rso":
        metrics["rso_accepted"] = accepted_total
        metrics["rso_acceptance_rate"] = accepted_total / candidates_total if candidates_total else 0.0
    return rows, metrics


def compute(ctx: StageContext) -> StageOutput:
    config: ConstructConfig = ctx.config
    samples = ctx.read("samples", SAMPLES)
    scores = _scores(ctx.read("labels", LABELS), config.labeler)
    by_prompt, dropped, reasons = collect_candidates(samples, scores, config.drop_truncated)
    rows, metrics = build_pairs(by_prompt, config)
    table = pa.Table.from_pylist(rows, schema=PREFERENCES.schema) if rows else PREFERENCES.schema.empty_table()
    drops = make_drops(samples, np.array(dropped, dtype=np.int64), reasons, "samples", detail="construct stage")
    metrics["samples_dropped"] = len(dropped)
    return StageOutput(table=table, drops=drops, metrics=metrics)
