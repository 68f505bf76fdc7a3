"""Reward-model ensembles: standardising each member on a reference set, and combining the k members'
rewards into one (shared by train-rm, label-rm, the label stage's ``reward_model`` labeler and evaluate).

Ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein
et al. 2023, "Helping or Herding?"). A Bradley–Terry reward model only learns differences
r(y_w) − r(y_l), so each member's offset (and, across seeds, its scale) is arbitrary: aggregating raw
rewards lets ``min`` pick whichever member happens to sit lowest. Each member i is therefore first
standardised on a reference set of completions with rewards r_i(y_1..y_m):

    μ_i = (1/m) Σ_j r_i(y_j),   σ_i = sqrt((1/m) Σ_j (r_i(y_j) − μ_i)²),   z_i(y) = (r_i(y) − μ_i) / σ_i

and the aggregates of the k standardised rewards z_1..z_k of one target are

* ``mean``                   R = z̄ = (1/k) Σ_i z_i
* ``min`` (worst case)       R = min_i z_i
* ``uncertainty_weighted``   R = z̄ − λ · (1/k) Σ_i (z_i − z̄)²   (population variance; λ ≥ 0)

Replacing member i's reward by a·r_i + c (a > 0) replaces μ_i by a·μ_i + c and σ_i by a·σ_i, so z_i
and every aggregate are unchanged. A pair's margin is the difference of standardised rewards,
z_i(y_w) − z_i(y_l) = (r_i(y_w) − r_i(y_l)) / σ_i (the offset cancels).

The reference set is fixed when the ensemble is trained: ``train-rm`` scores the distinct
completions of its held-out pairs (its training pairs when none are held out) with every member and
writes μ_i, σ_i into the ensemble's files (``standardisation.json``), so a completion's
standardised reward does not depend on what else is scored with it. An ensemble without that file
(written before it existed) is standardised on the targets of the call itself, with a note.

Pure numpy and json; imports no stage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from prefloop.errors import UserError

Aggregation = Literal["mean", "min", "uncertainty_weighted"]
STANDARDISATION_FILE = "standardisation.json"
PER_CALL_NOTE = ("the ensemble has no stored reference statistics (standardisation.json, written by train-rm since "
                 "standardised ensembles): each member was standardised on the targets of this call instead; "
                 "retrain it with train-rm for call-independent scores")


def _as_member_array(rewards: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
    array = np.asarray(rewards, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{what} needs a [members, targets] array with at least one member, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=0).sum())
        raise UserError(f"{what} got non-finite rewards for {bad} target(s): NaN/inf rewards cannot be "
                         "standardised or averaged; drop those targets first (label-rm drops them as 'nonfinite_reward')")
    return array


@dataclass(frozen=True)
class MemberStandardisation:
    """Per member i: μ_i and σ_i of its rewards on a reference set (see the module docstring)."""

    means: tuple[float, ...]
    stds: tuple[float, ...]
    reference: str  # what the reference set was, for people: "heldout completions", "targets of the call"
    count: int  # m, the number of reference completions

    @classmethod
    def fit(cls, reference_rewards: np.ndarray | Sequence[Sequence[float]], reference: str) -> MemberStandardisation:
        """μ_i = mean_j r_i(y_j) and σ_i = population std_j r_i(y_j) of rewards shaped [members, m]."""
        array = _as_member_array(reference_rewards, "standardisation")
        means, stds = array.mean(axis=1), array.std(axis=1)
        flat = [i for i, std in enumerate(stds) if not std > 1e-12]
        if flat:
            raise UserError(
                f"cannot standardise ensemble member(s) {flat} on the {array.shape[1]} {reference}: each gives all of "
                "them the same reward (σ = 0), so its scale is undefined. Use a reference set with at least two "
                "completions the member tells apart (more held-out pairs: raise heldout_fraction), or retrain the "
                "member (another seed, more steps)")
        return cls(tuple(float(m) for m in means), tuple(float(s) for s in stds), reference, int(array.shape[1]))

    @property
    def members(self) -> int:
        return len(self.means)

    def apply(self, rewards: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """z_i = (r_i − μ_i) / σ_i for rewards shaped [members, n]."""
        array = _as_member_array(rewards, "standardisation")
        if array.shape[0] != self.members:
            raise UserError(f"the stored standardisation has {self.members} members but {array.shape[0]} members' "
                             f"rewards were given: {STANDARDISATION_FILE} does not belong to this ensemble; retrain "
                             "it with train-rm")
        return (array - np.asarray(self.means)[:, None]) / np.asarray(self.stds)[:, None]

    def to_dict(self) -> dict[str, object]:
        return {"means": list(self.means), "stds": list(self.stds), "reference": self.reference, "count": self.count}

    def write(self, model_dir: str | Path) -> Path:
        """Write ``standardisation.json`` into an ensemble's directory."""
        path = Path(model_dir) / STANDARDISATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, model_dir: str | Path) -> MemberStandardisation | None:
        """The stored standardisation of an ensemble directory, or None when it has none."""
        path = Path(model_dir) / STANDARDISATION_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(tuple(data["means"]), tuple(data["stds"]), str(data["reference"]), int(data["count"]))


def combine_standardised(standardised: np.ndarray, aggregation: Aggregation,
                         uncertainty_penalty: float = 0.5) -> np.ndarray:
    """Aggregate already standardised rewards z, shape [k, n], into one per target, shape [n].

    ``mean``: z̄; ``min``: min_i z_i; ``uncertainty_weighted``: z̄ − λ·(1/k) Σ_i (z_i − z̄)² with
    λ = ``uncertainty_penalty`` (Coste et al. 2023, UWO).
    """
    array = _as_member_array(standardised, "combine_standardised")
    if uncertainty_penalty < 0:
        raise UserError(f"uncertainty_penalty must be >= 0 (it subtracts λ·variance), got {uncertainty_penalty}")
    if aggregation == "mean":
        return array.mean(axis=0)
    if aggregation == "min":
        return array.min(axis=0)
    if aggregation == "uncertainty_weighted":
        return array.mean(axis=0) - uncertainty_penalty * array.var(axis=0)
    raise UserError(f"unknown aggregation '{aggregation}'; valid: mean, min, uncertainty_weighted")


def standardisation_for(rewards: np.ndarray, stored: MemberStandardisation | None) -> MemberStandardisation:
    """The stored reference statistics, or (without them) the members' statistics on these rewards."""
    return stored if stored is not None else MemberStandardisation.fit(rewards, "targets of the call")


def aggregate_rewards(rewards: np.ndarray | Sequence[Sequence[float]], aggregation: Aggregation,
                      uncertainty_penalty: float = 0.5,
                      standardisation: MemberStandardisation | None = None) -> np.ndarray:
    """Standardise each member, then aggregate: rewards [k, n] → one reward per target [n].

    ``standardisation`` holds μ_i, σ_i from the ensemble's reference set; None standardises each member
    on the n targets given (which needs n ≥ 2 rewards that differ). Invariant to a·r_i + c, a > 0.
    """
    array = _as_member_array(rewards, "aggregate_rewards")
    return combine_standardised(standardisation_for(array, standardisation).apply(array), aggregation,
                                uncertainty_penalty)


def aggregate_margins(chosen_rewards: np.ndarray, rejected_rewards: np.ndarray, aggregation: Aggregation,
                      uncertainty_penalty: float = 0.5,
                      standardisation: MemberStandardisation | None = None) -> np.ndarray:
    """Aggregate the members' standardised margins z_i(y_w) − z_i(y_l) = (r_i(y_w) − r_i(y_l)) / σ_i.

    Without ``standardisation`` each member's σ_i is taken over the chosen and rejected rewards together.
    """
    chosen = _as_member_array(chosen_rewards, "aggregate_margins")
    rejected = _as_member_array(rejected_rewards, "aggregate_margins")
    scale = standardisation_for(np.concatenate([chosen, rejected], axis=1), standardisation)
    return combine_standardised(scale.apply(chosen) - scale.apply(rejected), aggregation, uncertainty_penalty)


def aggregation_name(aggregation: Aggregation, uncertainty_penalty: float) -> str:
    """Short name of an aggregate for labeler ids, e.g. ``mean``, ``min``, ``mean-0.5var``."""
    return f"mean-{uncertainty_penalty:g}var" if aggregation == "uncertainty_weighted" else aggregation
