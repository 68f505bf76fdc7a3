"""Label-flip rates: the one definition of ε from a pair's confidence, and a scorer's misranking rates
measured on clean held-out pairs (what the filter stage calibrates its flip-rate estimate with).

**ε from confidence — the one definition** (filter, evaluate and train all call these functions). A
pair's ``confidence`` is its probability that *chosen* really is better than *rejected*. Its label-flip
rate is

    ε_i = min(max(1 − confidence_i, 0), ½)                                      (:func:`pair_flip_rate`)

and the flip rate of a set of pairs is the mean of the ε_i of the pairs that carry a confidence
(:func:`estimated_flip_rate`). The clamp at ½ is MCTS-DPO's rule (Xie et al. 2024): a pair whose
confidence is at or below one half carries no information, never a reversed one — the robust losses
(cdpo, rdpo) are not defined beyond ε = ½. A missing or non-finite confidence has no ε (None): the
pair takes the loss's global ε, and the set's mean leaves it out.

**Misranking rates of a scorer** (:class:`MisrankingCalibration`). Train-rm scores its held-out pairs —
clean labels (the verifier's), never trained on — with every ensemble member and takes the strength
s = mean_m (r_m(y_w) − r_m(y_l)), the same figure the filter computes from label-rm's member rows. It
bins the pairs by |s| (quantile edges, at most :data:`MAX_BINS` bins of at least :data:`MIN_PAIRS_PER_BIN`
pairs) and counts per bin b the pairs n_b and the misranked ones m_b (s < 0; s = 0 counts ½). The
misranking rate of bin b is the Jeffreys-smoothed share

    q_b = (m_b + ½) / (n_b + 1)

(the posterior mean under a Beta(½, ½) prior: never exactly 0 or 1, so a per-pair posterior stays
finite). The statistics go into train-rm's manifest metrics under :data:`MISRANKING_METRIC`, as the
ensemble's standardisation does (:mod:`prefloop.tasks.common.ensembles`). They are only valid for pairs
whose labels were clean: held-out pairs with flipped labels would make q_b absorb the flips.

Pure numpy; imports no stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefloop.errors import UserError

MISRANKING_METRIC = "heldout_misranking"
"""The train-rm manifest metric holding :meth:`MisrankingCalibration.to_dict`."""
MAX_BINS = 5
MIN_PAIRS_PER_BIN = 20


# ---------------------------------------------------------------------------------------------
# ε from confidence
# ---------------------------------------------------------------------------------------------
def pair_flip_rate(confidence: float | None) -> float | None:
    """A pair's label-flip rate ε = min(max(1 − confidence, 0), ½); None without a (finite) confidence."""
    if confidence is None or not math.isfinite(confidence):
        return None
    return min(max(1.0 - confidence, 0.0), 0.5)


def pair_flip_rates(confidences: Sequence[float | None]) -> list[float | None]:
    """:func:`pair_flip_rate` of each pair, in order."""
    return [pair_flip_rate(confidence) for confidence in confidences]


def estimated_flip_rate(confidences: Sequence[float | None]) -> float | None:
    """The flip rate of a set of pairs: the mean of :func:`pair_flip_rate` over the pairs that carry a
    confidence; None when none does (verifier labels, for instance, are exact and state no confidence)."""
    known = [rate for rate in pair_flip_rates(confidences) if rate is not None]
    return float(np.mean(known)) if known else None


def confidence_from_flip_probability(probability: float) -> float:
    """The confidence that states a pair's probability of a wrong label: 1 − P(wrong)."""
    return 1.0 - probability


# ---------------------------------------------------------------------------------------------
# A scorer's misranking rates on clean held-out pairs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MisrankingCalibration:
    """Per |s| bin: how many clean held-out pairs (n_b) and how many the scorer misranked (m_b).

    Bin b holds |s| in [edges[b−1], edges[b]) with edges[−1] = 0 and the last bin open above, so
    ``edges`` has one entry fewer than there are bins.
    """

    edges: tuple[float, ...]
    pairs: tuple[int, ...]
    misranked: tuple[float, ...]
    members: int  # ensemble members whose mean margin is s (1: a single reward model)
    reference: str  # what the held-out pairs were, for people

    @classmethod
    def fit(cls, strengths: Sequence[float] | np.ndarray, members: int, reference: str,
            max_bins: int = MAX_BINS, min_pairs_per_bin: int = MIN_PAIRS_PER_BIN) -> MisrankingCalibration:
        """Bin clean pairs' strengths s (in the direction of their correct label) by |s| at quantiles."""
        strength = np.asarray(strengths, dtype=np.float64)
        strength = strength[np.isfinite(strength)]
        if len(strength) == 0:
            raise UserError(f"cannot measure a misranking rate on zero scored pairs ({reference}): hold out "
                            "some clean pairs (train-rm heldout_fraction > 0, or a heldout input)")
        bins = max(1, min(max_bins, len(strength) // max(min_pairs_per_bin, 1)))
        magnitude = np.abs(strength)
        inner = np.unique(np.quantile(magnitude, np.arange(1, bins) / bins)) if bins > 1 else np.array([])
        calibration = cls(tuple(float(e) for e in inner), (), (), int(members), reference)
        index = calibration.bin_of(magnitude)
        wrong = (strength < 0) + 0.5 * (strength == 0)
        counts = np.bincount(index, minlength=len(inner) + 1)
        misranked = np.bincount(index, weights=wrong, minlength=len(inner) + 1)
        return cls(calibration.edges, tuple(int(c) for c in counts), tuple(float(m) for m in misranked),
                   int(members), reference)

    def bin_of(self, magnitude: np.ndarray) -> np.ndarray:
        """The bin index of each |s|."""
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), np.abs(magnitude), side="right")

    @property
    def rates(self) -> np.ndarray:
        """q_b = (m_b + ½) / (n_b + 1) per bin."""
        return (np.asarray(self.misranked) + 0.5) / (np.asarray(self.pairs, dtype=np.float64) + 1.0)

    def misranking(self, strength: np.ndarray) -> np.ndarray:
        """q_{b(i)} of each pair: the misranking rate of the bin its |s_i| falls in."""
        return self.rates[self.bin_of(np.asarray(strength, dtype=np.float64))]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "pairs": list(self.pairs), "misranked": list(self.misranked),
                "members": self.members, "reference": self.reference,
                "rates": [float(q) for q in self.rates]}  # for people; recomputed from the counts on read

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MisrankingCalibration:
        edges, pairs, misranked = (tuple(data[key]) for key in ("edges", "pairs", "misranked"))
        if not (len(pairs) == len(misranked) == len(edges) + 1):
            raise UserError(f"stored misranking statistics are inconsistent ({len(edges)} edges, {len(pairs)} pair "
                            f"counts, {len(misranked)} misranked counts; a bin needs one of each and one edge fewer): "
                            "retrain the reward model with train-rm")
        return cls(tuple(float(e) for e in edges), tuple(int(p) for p in pairs),
                   tuple(float(m) for m in misranked), int(data["members"]), str(data["reference"]))
