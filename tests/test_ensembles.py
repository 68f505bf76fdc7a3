"""Reward-model ensembles: each member standardised on a reference set before it is aggregated
(Coste et al. 2023; Eisenstein et al. 2023), on hand-derived numbers.

Reference rewards: member 0 gives [0, 2] (μ = 1, σ = 1), member 1 gives [10, 14] (μ = 12, σ = 2).
Targets: member 0 gives [1, 3, 0], member 1 gives [12, 11, 16], so
z_0 = [0, 2, −1] and z_1 = [0, −0.5, 2].
"""

import numpy as np
import pytest

from prefloop.errors import UserError
from prefloop.tasks.common.ensembles import (
    STANDARDISATION_FILE,
    MemberStandardisation,
    aggregate_margins,
    aggregate_rewards,
)

REFERENCE = np.array([[0.0, 2.0], [10.0, 14.0]])
TARGETS = np.array([[1.0, 3.0, 0.0], [12.0, 11.0, 16.0]])


def _transformed(rewards: np.ndarray, member: int, scale: float, shift: float) -> np.ndarray:
    out = rewards.copy()
    out[member] = scale * out[member] + shift
    return out


def test_standardisation_on_the_reference_set_by_hand() -> None:
    stats = MemberStandardisation.fit(REFERENCE, "hand")
    assert stats.means == (1.0, 12.0) and stats.stds == (1.0, 2.0) and stats.count == 2
    assert stats.apply(TARGETS).tolist() == [[0.0, 2.0, -1.0], [0.0, -0.5, 2.0]]
    assert aggregate_rewards(TARGETS, "mean", standardisation=stats).tolist() == pytest.approx([0.0, 0.75, 0.5])
    # population variances of (z_0, z_1): 0, ((2 − 0.75)² + (−0.5 − 0.75)²)/2 = 1.5625, (1.5² + 1.5²)/2 = 2.25
    assert aggregate_rewards(TARGETS, "uncertainty_weighted", 0.5, stats).tolist() == pytest.approx(
        [0.0, 0.75 - 0.5 * 1.5625, 0.5 - 0.5 * 2.25])


def test_min_picks_by_standardised_value_not_by_the_lowest_offset() -> None:
    stats = MemberStandardisation.fit(REFERENCE, "hand")
    raw_min = TARGETS.min(axis=0)  # [1, 3, 0]: always member 0, whose offset is lower
    standardised_min = aggregate_rewards(TARGETS, "min", standardisation=stats)
    assert standardised_min.tolist() == [0.0, -0.5, -1.0]  # target 1's worst case is member 1 (−0.5 < 2)
    # the raw min would call target 1 the best; the standardised worst case prefers target 0
    assert int(np.argmax(raw_min)) == 1 and int(np.argmax(standardised_min)) == 0


@pytest.mark.parametrize(("member", "scale", "shift"), [(0, 1.0, -7.0), (1, 1.0, 100.0), (1, 3.0, 0.0),
                                                         (0, 0.25, 5.0)])
@pytest.mark.parametrize("aggregation", ["mean", "min", "uncertainty_weighted"])
def test_aggregate_is_invariant_to_one_members_offset_and_scale(member, scale, shift, aggregation) -> None:
    stats = MemberStandardisation.fit(REFERENCE, "hand")
    moved = MemberStandardisation.fit(_transformed(REFERENCE, member, scale, shift), "hand")
    before = aggregate_rewards(TARGETS, aggregation, 0.5, stats)
    after = aggregate_rewards(_transformed(TARGETS, member, scale, shift), aggregation, 0.5, moved)
    assert after.tolist() == pytest.approx(before.tolist(), abs=1e-12)
    # without stored statistics each member is standardised on the targets of the call: invariant too
    per_call = aggregate_rewards(TARGETS, aggregation, 0.5)
    assert aggregate_rewards(_transformed(TARGETS, member, scale, shift), aggregation, 0.5).tolist() == \
        pytest.approx(per_call.tolist(), abs=1e-12)


def test_pair_margins_are_divided_by_each_members_scale() -> None:
    stats = MemberStandardisation.fit(REFERENCE, "hand")
    chosen, rejected = np.array([[3.0, 3.0], [16.0, 11.0]]), np.array([[1.0, 1.0], [12.0, 12.0]])
    # pair 0: d_0 = 2 / σ_0 = 2, d_1 = 4 / σ_1 = 2; pair 1: d_0 = 2, d_1 = −1 / 2 = −0.5
    assert aggregate_margins(chosen, rejected, "mean", standardisation=stats).tolist() == [2.0, 0.75]
    assert aggregate_margins(chosen, rejected, "min", standardisation=stats).tolist() == [2.0, -0.5]
    moved = MemberStandardisation.fit(_transformed(REFERENCE, 1, 10.0, 3.0), "hand")
    assert aggregate_margins(_transformed(chosen, 1, 10.0, 3.0), _transformed(rejected, 1, 10.0, 3.0), "min",
                             standardisation=moved).tolist() == pytest.approx([2.0, -0.5])


def test_statistics_round_trip_through_the_ensembles_files(tmp_path) -> None:
    assert MemberStandardisation.read(tmp_path) is None  # an ensemble written before standardisation
    stats = MemberStandardisation.fit(REFERENCE, "held-out completions")
    assert stats.write(tmp_path).name == STANDARDISATION_FILE
    assert MemberStandardisation.read(tmp_path) == stats


def test_members_that_cannot_be_standardised_are_refused_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"member\(s\) \[0\].*σ = 0.*raise heldout_fraction"):
        MemberStandardisation.fit([[1.0, 1.0], [0.0, 2.0]], "held-out completions")
    with pytest.raises(UserError, match="has 2 members but 3"):
        MemberStandardisation.fit(REFERENCE, "hand").apply(np.ones((3, 2)))
    with pytest.raises(UserError, match="non-finite"):
        MemberStandardisation.fit([[1.0, float("nan")], [0.0, 2.0]], "hand")
