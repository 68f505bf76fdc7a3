"""Label-flip rates from preference confidences: the share of pairs whose preference is wrong.

A pair's ``confidence`` is its probability that *chosen* really is better than *rejected*, so its
flip probability is 1 − confidence. Two uses:

- :func:`estimated_flip_rate`: the expected flip rate of a set of pairs, ε̂ = mean_i (1 − confidence_i)
  (the evaluate stage's data statistics);
- :func:`pair_flip_rate`: a pair's ε for the robust losses, min(1 − confidence, 0.5) (MCTS-DPO's rule,
  Xie et al. 2024): a pair with confidence at or below one half carries no information, never a
  reversed one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def estimated_flip_rate(confidences: Sequence[float | None]) -> float | None:
    """Expected share of pairs whose preference is wrong: ε̂ = mean_i (1 − confidence_i).

    ``confidence`` is a pair's probability that *chosen* really is better; None when no pair
    carries one (verifier labels, for instance, are exact and state no confidence).
    """
    known = [c for c in confidences if c is not None and math.isfinite(c)]
    return float(np.mean([1.0 - c for c in known])) if known else None


def pair_flip_rate(confidence: float | None) -> float | None:
    """A pair's label-flip rate ε = min(1 − confidence, 0.5); None for a pair without a confidence."""
    return None if confidence is None else min(1.0 - confidence, 0.5)


def pair_flip_rates(confidences: Sequence[float | None]) -> list[float | None]:
    """:func:`pair_flip_rate` of each pair, in order."""
    return [pair_flip_rate(confidence) for confidence in confidences]
