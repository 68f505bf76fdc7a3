"""Consistency across rounds (CREAM): how far this round's and the previous round's rewards agree on the
ranking of a prompt's responses sets the confidence of that prompt's pairs.

CREAM ("CREAM: Consistency Regularized Self-Rewarding Language Models", Wang et al. 2024, ICLR 2025): the
model of round t and the model of round t − 1 both score the same n responses of a prompt; Kendall's τ
between the two rankings gives the consistency rate C = (τ + 1)/2 ∈ [0, 1], and the prompt's pair is
trained with labels smoothed by C, loss = C·ℓ(βh) + (1 − C)·ℓ(−βh) — conservative DPO with ε = 1 − C.
Here C becomes the pair's ``confidence``, so the robust losses read ε through the project's one
definition (:func:`prefloop.tasks.common.confidence.pair_flip_rate`): ε = min(1 − C, ½). A perfectly
consistent ranking gives C = 1, ε = 0; independent rankings give C = ½, ε = ½; a reversed ranking gives
C = 0, whose ε is clamped to ½ (a label the two rounds contradict carries no information, never a
reversed one; the authors' C·ℓ(βh) + (1 − C)·ℓ(−βh) would train it reversed).

Kendall's τ is τ-b (scipy's default ``kendalltau`` variant), so tied rewards — frequent with verifier or
coarse reward scores — are handled: over the n(n − 1)/2 pairs i < j of a prompt's responses,

    τ_b = Σ_{i<j} sign(x_i − x_j)·sign(y_i − y_j) / sqrt((n₀ − n_x)(n₀ − n_y)),

n₀ = n(n − 1)/2, n_x and n_y the pairs tied in x and in y. (The authors' code ranks with ties broken by
position, which makes a tie an arbitrary order.) τ_b is undefined when one round gives every response
the same reward, or fewer than two responses are scored by both rounds.

Inputs: two ``labels`` artifacts of the same samples (``target_kind = "sample"``, ``target_id`` = sample
id, ``prompt_id`` set). In the loop (from round 2) both come from stage ``label-policy``
(:mod:`prefloop.tasks.policy_rewards`), as in the authors' code: ``consistency_labels`` the round's policy's
DPO implicit reward log π − log π_0 against the starting policy π_0, ``previous_labels`` the previous
round's policy's (its mean token log-likelihood when it is π_0 itself); any two rewards of the same
samples work, e.g. reward models'. Each artifact is read for one labeler: the one named in the config, or
its only labeler.

Fallback for missing scores (documented, not an error): a sample scored in one round only is left out of
its prompt's τ; a pair whose prompt then has fewer than two responses scored in both rounds, or whose τ
is undefined, keeps the confidence it came with and is counted (``consistency_unscored_pairs``). When no
pair at all gets a consistency, the inputs do not describe the same samples: that is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.stage import StageInputError


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b of two score vectors of the same responses (module docstring); NaN when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau_b needs two scores per response, got shapes {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        return math.nan
    upper = np.triu_indices(n, k=1)
    sign_x = np.sign(x[:, None] - x[None, :])[upper]
    sign_y = np.sign(y[:, None] - y[None, :])[upper]
    pairs = n * (n - 1) / 2
    untied_x, untied_y = pairs - np.sum(sign_x == 0), pairs - np.sum(sign_y == 0)
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float(np.sum(sign_x * sign_y) / math.sqrt(untied_x * untied_y))


def consistency_rate(tau: float) -> float:
    """C = (τ + 1)/2: 1 for the same ranking, ½ for unrelated ones, 0 for a reversed one."""
    return (tau + 1.0) / 2.0


def _one_labeler(labels: pa.Table, labeler: str | None, role: str) -> pa.Table:
    """The sample rows of one labeler: the named one, or the artifact's only one."""
    labels = labels.filter(pc.equal(labels.column("target_kind"), "sample"))
    names = sorted(set(labels.column("labeler").to_pylist()))
    if labeler is None:
        if len(names) != 1:
            raise StageInputError(
                f"CREAM: {role} has {len(names)} labelers scoring samples ({names[:5]}), so it is unclear whose "
                f"rewards rank the responses: set the filter's {'consistency_labeler' if role == 'consistency_labels' else 'previous_labeler'} "
                "to one of them (or pass a labels artifact with one labeler).")
        labeler = names[0]
    elif labeler not in names:
        raise StageInputError(f"CREAM: {role} has no labeler '{labeler}' scoring samples (it has {names[:5]}): "
                              "name one of those, or leave the key unset when the artifact has a single labeler.")
    rows = labels.filter(pc.equal(labels.column("labeler"), labeler))
    if pc.count_distinct(rows.column("target_id")).as_py() != rows.num_rows:
        raise StageInputError(f"CREAM: {role} scores some sample more than once under labeler '{labeler}': keep one "
                              "reward per sample and labeler.")
    return rows


@dataclass
class Consistency:
    """Per prompt id: C = (τ_b + 1)/2 and the number of responses both rounds scored."""

    rate: dict[str, float]
    responses: dict[str, int]


def prompt_consistency(current: pa.Table, previous: pa.Table, current_labeler: str | None = None,
                       previous_labeler: str | None = None) -> Consistency:
    """C per prompt from two labels tables of the same samples (module docstring); prompts with an undefined
    τ (fewer than two shared responses, or one round's rewards all tied) are absent from ``rate``."""
    now = _one_labeler(current, current_labeler, "consistency_labels")
    before = _one_labeler(previous, previous_labeler, "previous_labels")
    if now.num_rows and now.column("prompt_id").null_count == now.num_rows:
        raise StageInputError("CREAM: consistency_labels has no prompt_id, so responses cannot be grouped by "
                              "prompt: label the samples with a stage that records prompt ids (label, label-rm).")
    earlier = dict(zip(before.column("target_id").to_pylist(), before.column("score").to_pylist(), strict=True))
    grouped: dict[str, tuple[list[float], list[float]]] = {}
    for sample, prompt, score in zip(*(now.column(c).to_pylist() for c in ("target_id", "prompt_id", "score")),
                                     strict=True):
        old = earlier.get(sample)
        if prompt is None or old is None or not (math.isfinite(score) and math.isfinite(old)):
            continue
        scores = grouped.setdefault(prompt, ([], []))
        scores[0].append(score)
        scores[1].append(old)
    rate, responses = {}, {}
    for prompt, (scores_now, scores_before) in grouped.items():
        responses[prompt] = len(scores_now)
        tau = kendall_tau_b(np.array(scores_now), np.array(scores_before))
        if math.isfinite(tau):
            rate[prompt] = consistency_rate(tau)
    return Consistency(rate, responses)


def pair_consistency(pairs: pa.Table, current: pa.Table, previous: pa.Table, current_labeler: str | None = None,
                     previous_labeler: str | None = None) -> tuple[np.ndarray, dict[str, float | int]]:
    """C of each pair's prompt (NaN where undefined) and the metrics that describe it."""
    consistency = prompt_consistency(current, previous, current_labeler, previous_labeler)
    prompts = pairs.column("prompt_id").to_pylist()
    rates = np.array([consistency.rate.get(p, math.nan) if p is not None else math.nan for p in prompts])
    known = np.isfinite(rates)
    if pairs.num_rows and not known.any():
        raise StageInputError(
            f"CREAM: none of the {pairs.num_rows} pairs' prompts has two responses scored in both consistency_labels "
            f"and previous_labels with rewards that are not all tied ({len(consistency.responses)} prompts share "
            "scored samples): pass labels of the same samples — the round's samples scored by this round's model and "
            "by the previous round's — or leave consistency_confidence off.")
    metrics: dict[str, float | int] = {
        "consistency_pairs": int(known.sum()), "consistency_unscored_pairs": int((~known).sum()),
        "consistency_prompts": len(consistency.rate)}
    if known.any():
        metrics["consistency_mean"] = float(rates[known].mean())
    return rates, metrics
