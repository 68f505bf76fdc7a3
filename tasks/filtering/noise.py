"""Label noise seen through a reward-model ensemble: per-pair preference strength and disagreement,
the flip of strongly negative pairs, and the estimated label-flip rate ε.

**Ensemble** (the filter's optional input ``ensemble_labels``, a ``labels`` artifact, as the ``label-rm``
stage writes it): one labeler per ensemble member, with rows either of ``target_kind = "sample"`` keyed by
``target_id`` = the pairs' ``chosen_sample_id`` / ``rejected_sample_id``, ``score`` = that member's reward
r_m(y), or of ``target_kind = "pair"`` keyed by ``pair_id`` with ``score`` = the member's margin; an
aggregate labeler ``rm-ensemble:…`` written next to the members is ignored. For a pair
with member margins d_m = r_m(y_w) − r_m(y_l), m = 1..k, the preference strength ("Secrets of RLHF in
Large Language Models Part II: Reward Modeling", Wang et al. 2024) is s = mean_m d_m and the
disagreement is std_m d_m (ddof = 1; 0 for k = 1). A pair is *scored* when every member has a finite
score for both samples. A flipped pair (:func:`flip_pairs`) has chosen and rejected (and their scores,
sample ids, sampled token ids and the margin's sign) swapped; its ``pair_id`` is recomputed from the new content and its
``method`` gets the suffix ``+flipped``.

**Estimated label-flip rate ε**, made on the pairs as they arrive, before the filter flips or drops any.
Model: a label is wrong (flipped) with probability ε, independently of the texts; a scorer (the ensemble
mean s) misranks a pair — s points against the *correct* order — with probability q_i, which depends on
the pair (on |s|). Two independent symmetric noises compose (class-conditional noise, Natarajan et al.
2013, "Learning with Noisy Labels"): the label and the scorer disagree (s < 0 in the label's direction)
with probability d_i = ε(1 − q_i) + (1 − ε)q_i = q_i + ε(1 − 2q_i). Summed over the pairs and solved
for ε (:func:`noise_corrected_flip_rate`):

    ε̂ = Σ_i (w_i − q_i) / Σ_i (1 − 2q_i) = (d̂ − q̄) / (1 − 2q̄),   clipped to [0, ½],

with w_i = 1 for s_i < 0, ½ for s_i = 0, 0 otherwise, d̂ = mean_i w_i and q̄ = mean_i q_i. Pairs whose q_i
is near ½ (the scorer cannot tell) weigh almost nothing in the pooled form. Where q_i comes from
(``flip_rate_estimator`` in the filter's metrics):

- ``calibrated``: q_i = q_b, the misranking rate of |s_i|'s bin measured on *clean* held-out pairs by
  train-rm (:class:`~prefloop.tasks.common.confidence.MisrankingCalibration`). It counts every mistake
  the scorer makes, including those all members share, so it stays unbiased when members err together.
- ``plug_in`` (no calibration available): a noise model of the ensemble's own spread — member margins
  d_m = Δ + e_m, e_m independent N(0, σ²) — gives q_i = Φ(−|s_i|/se), se = σ̂/√k, σ̂² the members'
  sample variance pooled over the scored pairs. With one member (or members that always agree) q_i = 0
  and ε̂ is the plain disagreement rate. Members that make the same mistakes look certain, so q̄ is
  too small and ε̂ too high: at 0 % flips the noise benchmark measured ε̂ = 0.34.

Measured on the demo's own pairs (round 1's, scored by a 3-member ensemble trained from the SFT policy on
rounds 2-3's verifier pairs, held-out accuracy 62 %; script in the issue-17 report): at 0 / 20 / 40 %
injected flips (true 0.000 / 0.208 / 0.440) the plug-in gave 0.324 / 0.393 / 0.484, the calibrated
estimate 0.029 / 0.215 / 0.458.

**Posterior probability of a wrong label** (:func:`flip_posterior`). With the prior ε and the scorer's
misranking rate q_i of the pair's |s| bin: a correct label sees s < 0 with probability q_i, a flipped
one with probability 1 − q_i (flipping negates s relative to the label), and |s| is distributed alike in
both cases (a flip changes the sign, not the size), so its likelihood cancels. Bayes' rule:

    P(wrong | s < 0) = ε(1 − q) / (ε(1 − q) + (1 − ε)q)
    P(wrong | s > 0) = εq / (εq + (1 − ε)(1 − q))
    P(wrong | s = 0) = ε.

The filter writes confidence = 1 − P(wrong | s) into the kept pairs when ``pair_flip_posterior`` is on;
for a pair it flipped, the posterior of the original label is computed first and the new label is
wrong exactly when the original was right: P = 1 − P(original wrong | s).
With the plug-in rates and one member (se = 0, so q = 0) the posterior is 0 or 1: it is only as good
as the misranking rates, which is why calibrated rates are the ones to use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefloop.stage import StageInputError
from prefloop.tasks.common.arrow import as_array
from prefloop.tasks.common.confidence import MisrankingCalibration
from prefloop.tasks.common.ids import pair_id

# label-rm writes an ensemble's aggregate under this prefix next to its members: not a member itself.
AGGREGATE_LABELER_PREFIX = "rm-ensemble:"


@dataclass
class Ensemble:
    """Per pair: the members' margins d_m = r_m(y_w) − r_m(y_l) (NaN where a score is missing)."""

    members: list[str]
    margins: np.ndarray  # shape (pairs, members)

    @property
    def scored(self) -> np.ndarray:
        return np.isfinite(self.margins).all(axis=1) if self.margins.shape[1] else np.zeros(len(self.margins), bool)

    @property
    def strength(self) -> np.ndarray:
        """s = mean_m d_m (NaN for unscored pairs)."""
        out = np.full(len(self.margins), np.nan)
        scored = self.scored
        if scored.any():
            out[scored] = self.margins[scored].mean(axis=1)
        return out

    @property
    def disagreement(self) -> np.ndarray:
        """std_m d_m with ddof = 1 (0 for one member; NaN for unscored pairs)."""
        out = np.full(len(self.margins), np.nan)
        scored = self.scored
        k = self.margins.shape[1]
        if scored.any():
            out[scored] = self.margins[scored].std(axis=1, ddof=1) if k > 1 else 0.0
        return out

    def flipped(self, rows: np.ndarray) -> Ensemble:
        margins = self.margins.copy()
        margins[rows] = -margins[rows]
        return Ensemble(self.members, margins)


def _lookup(keys: pa.Array, targets: pa.Array, scores: np.ndarray) -> np.ndarray:
    """The score of each key in (targets, scores), NaN where the key has none."""
    position = as_array(pc.index_in(keys, value_set=targets)).to_numpy(zero_copy_only=False).astype(np.float64)
    found = np.isfinite(position)
    out = np.full(len(keys), np.nan)
    out[found] = scores[position[found].astype(np.int64)]
    return out


def ensemble_margins(pairs: pa.Table, labels: pa.Table) -> Ensemble:
    """Each ensemble member's margin d_m = r_m(y_w) − r_m(y_l) for every pair.

    ``labels`` holds one labeler per member (aggregates named ``rm-ensemble:…`` are skipped). A member
    scores samples (``target_kind = "sample"``, ``target_id`` = the pairs' chosen/rejected sample ids: the
    margin is the difference) or pairs (``target_kind = "pair"``, ``target_id`` = pair id, ``score`` = the
    margin itself), as the ``label-rm`` stage writes them. A missing or non-finite score leaves that
    member's margin NaN (the pair is then unscored).
    """
    labels = labels.filter(pc.invert(pc.starts_with(labels.column("labeler"), AGGREGATE_LABELER_PREFIX)))
    kinds = set(labels.column("target_kind").to_pylist()) if labels.num_rows else set()
    if kinds - {"sample", "pair"}:
        raise StageInputError(
            f"ensemble_labels must score samples or pairs, but it has target kinds {sorted(kinds)}: score the pairs' "
            "chosen and rejected samples (or the pairs) with every ensemble member (stage label-rm).")
    if "sample" in kinds:
        for column in ("chosen_sample_id", "rejected_sample_id"):
            if pairs.num_rows and pairs.column(column).null_count == pairs.num_rows:
                raise StageInputError(
                    f"the preference pairs have no {column}, so the ensemble's per-sample scores cannot be matched "
                    "to them: build the pairs with the construct stage (which records sample ids), label the pairs "
                    "themselves (label-rm with input preferences), or leave out ensemble_labels.")
    members = sorted(set(labels.column("labeler").to_pylist()))
    chosen, rejected = as_array(pairs.column("chosen_sample_id")), as_array(pairs.column("rejected_sample_id"))
    pair_ids = as_array(pairs.column("pair_id"))
    margins = np.full((pairs.num_rows, len(members)), np.nan)
    for column_index, member in enumerate(members):
        mine = labels.filter(pc.equal(labels.column("labeler"), member))
        for kind in ("sample", "pair"):
            rows = mine.filter(pc.equal(mine.column("target_kind"), kind))
            if rows.num_rows == 0:
                continue
            targets = as_array(rows.column("target_id"))
            if pc.count_distinct(targets).as_py() != len(targets):
                counts = pc.value_counts(targets)
                twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
                raise StageInputError(
                    f"ensemble_labels has several scores for the same {kind} by labeler '{member}' (e.g. {twice}): "
                    f"keep one score per {kind} and member (one labeler name per ensemble member).")
            scores = as_array(rows.column("score")).to_numpy(zero_copy_only=False).astype(np.float64)
            if kind == "sample":
                found = _lookup(chosen, targets, scores) - _lookup(rejected, targets, scores)
            else:
                found = _lookup(pair_ids, targets, scores)
            fill = np.isnan(margins[:, column_index])
            margins[fill, column_index] = found[fill]
    margins[~np.isfinite(margins)] = np.nan
    return Ensemble(members, margins)


def pooled_standard_error(ensemble: Ensemble) -> float:
    """se = σ̂/√k, σ̂² the members' sample variance pooled over the scored pairs (0 for k = 1)."""
    k = ensemble.margins.shape[1]
    scored = ensemble.scored
    if k < 2 or not scored.any():
        return 0.0
    return float(math.sqrt(ensemble.margins[scored].var(axis=1, ddof=1).mean() / k))


def disagreement_weights(strength: np.ndarray) -> np.ndarray:
    """w_i = 1 where the scorer disagrees with the label (s < 0), ½ at s = 0, 0 otherwise."""
    return (strength < 0) + 0.5 * (strength == 0)


def plug_in_misranking(strength: np.ndarray, standard_error: float) -> np.ndarray:
    """q_i = Φ(−|s_i| / se), the plug-in misranking rate of the ensemble's spread (0 for se = 0)."""
    from scipy.special import ndtr  # the standard normal CDF Φ (imported here: the CLI starts faster)

    if standard_error <= 0:
        return np.zeros(len(strength))
    return ndtr(-np.abs(strength) / standard_error)


def noise_corrected_flip_rate(strength: np.ndarray, misranking: np.ndarray) -> float | None:
    """ε̂ = Σ_i (w_i − q_i) / Σ_i (1 − 2q_i), clipped to [0, ½] (module docstring); None for no pairs.

    ``strength``: s_i in the direction of each pair's label (finite values only); ``misranking``: the
    scorer's q_i of each pair. When q̄ ≥ ½ the scorer is pure noise and nothing can be said: ½.
    """
    if len(strength) == 0:
        return None
    disagreement = float(np.mean(disagreement_weights(strength)))
    misranked = float(np.mean(misranking))
    if misranked >= 0.5:
        return 0.5
    return float(min(max((disagreement - misranked) / (1.0 - 2.0 * misranked), 0.0), 0.5))


def estimate_flip_rate(strength: np.ndarray, standard_error: float) -> float | None:
    """The plug-in estimate: :func:`noise_corrected_flip_rate` with q_i = Φ(−|s_i|/se) (module docstring)."""
    return noise_corrected_flip_rate(strength, plug_in_misranking(strength, standard_error))


def calibrated_flip_rate(strength: np.ndarray, calibration: MisrankingCalibration) -> float | None:
    """The calibrated estimate: :func:`noise_corrected_flip_rate` with q_i = q_b of |s_i|'s bin."""
    return noise_corrected_flip_rate(strength, calibration.misranking(strength))


def flip_posterior(strength: np.ndarray, prior: float, misranking: np.ndarray) -> np.ndarray:
    """P(label wrong | s) per pair by Bayes' rule with prior ε and misranking rates q_i (module docstring)."""
    q = np.clip(np.asarray(misranking, dtype=np.float64), 0.0, 1.0)
    against = prior * (1.0 - q) / np.maximum(prior * (1.0 - q) + (1.0 - prior) * q, 1e-300)
    along = prior * q / np.maximum(prior * q + (1.0 - prior) * (1.0 - q), 1e-300)
    return np.where(strength < 0, against, np.where(strength > 0, along, prior))


def flip_pairs(pairs: pa.Table, rows: np.ndarray) -> pa.Table:
    """Swap chosen and rejected (texts, scores, sample ids, sampled token ids, the margin's sign) of ``rows``;
    new pair ids. The token ids move with their texts: training feeds them in place of the texts."""
    if len(rows) == 0:
        return pairs
    mask = np.zeros(pairs.num_rows, dtype=bool)
    mask[rows] = True
    flags = pa.array(mask)
    columns = {name: pairs.column(name) for name in pairs.column_names}
    for first, second in (("chosen", "rejected"), ("score_chosen", "score_rejected"),
                          ("chosen_sample_id", "rejected_sample_id"), ("chosen_token_ids", "rejected_token_ids")):
        if first not in columns:
            continue
        columns[first], columns[second] = (pc.if_else(flags, pairs.column(second), pairs.column(first)),
                                           pc.if_else(flags, pairs.column(first), pairs.column(second)))
    columns["margin"] = pc.if_else(flags, pc.negate(pairs.column("margin")), pairs.column("margin"))
    ids = np.array(pairs.column("pair_id").to_pylist(), dtype=object)
    methods = np.array(pairs.column("method").to_pylist(), dtype=object)
    prompts, chosen, rejected = (columns[c].take(pa.array(rows)).to_pylist() for c in ("prompt", "chosen", "rejected"))
    ids[rows] = [pair_id(p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    methods[rows] = [f"{m or 'unknown'}+flipped" for m in methods[rows]]
    columns["pair_id"] = pa.array(ids, pa.string())
    columns["method"] = pa.array(methods, pa.string())
    return pa.Table.from_arrays([columns[name] for name in pairs.column_names], schema=pairs.schema)
