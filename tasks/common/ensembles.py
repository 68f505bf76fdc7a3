"""Reward-model ensembles: combining the rewards of k members into one (shared by train-rm and label-rm).

Ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein
et al. 2023): for the k rewards r_1..r_k of one target,

* ``mean``                   R = r̄ = (1/k) Σ_i r_i
* ``min`` (worst case)       R = min_i r_i
* ``uncertainty_weighted``   R = r̄ − λ · (1/k) Σ_i (r_i − r̄)²   (population variance; λ ≥ 0)

Pure numpy; imports no stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from prefloop.errors import UserError

Aggregation = Literal["mean", "min", "uncertainty_weighted"]


def aggregate_rewards(rewards: np.ndarray | Sequence[Sequence[float]], aggregation: Aggregation,
                      uncertainty_penalty: float = 0.5) -> np.ndarray:
    """Combine the rewards of k members, shape [k, n], into one reward per target, shape [n].

    ``mean``: r̄; ``min``: min_i r_i; ``uncertainty_weighted``: r̄ − λ·Var_i(r_i) with the population
    variance (1/k) Σ (r_i − r̄)² and λ = ``uncertainty_penalty`` (Coste et al. 2023, UWO).
    """
    array = np.asarray(rewards, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"aggregate_rewards needs a [members, targets] array with at least one member, "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=0).sum())
        raise UserError(f"aggregate_rewards got non-finite rewards for {bad} target(s): NaN/inf rewards cannot "
                         "be averaged; drop those targets first (label-rm drops them as 'nonfinite_reward')")
    if uncertainty_penalty < 0:
        raise UserError(f"uncertainty_penalty must be >= 0 (it subtracts λ·variance), got {uncertainty_penalty}")
    if aggregation == "mean":
        return array.mean(axis=0)
    if aggregation == "min":
        return array.min(axis=0)
    if aggregation == "uncertainty_weighted":
        return array.mean(axis=0) - uncertainty_penalty * array.var(axis=0)
    raise UserError(f"unknown aggregation '{aggregation}'; valid: mean, min, uncertainty_weighted")


def aggregation_name(aggregation: Aggregation, uncertainty_penalty: float) -> str:
    """Short name of an aggregate for labeler ids, e.g. ``mean``, ``min``, ``mean-0.5var``."""
    return f"mean-{uncertainty_penalty:g}var" if aggregation == "uncertainty_weighted" else aggregation
