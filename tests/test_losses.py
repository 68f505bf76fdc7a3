"""Loss registry: values and gradients against numbers derived by hand."""

import pytest
import torch

from prefloop.tasks.training.losses import (
    LOSSES,
    LossHyperparameters,
    SequenceLogps,
    get_loss,
    sft_loss,
    sigmoid_loss,
)


def _pair_logps() -> SequenceLogps:
    # Pair 1: r(y_w) = −2 − (−3) = 1, r(y_l) = −4 − (−3.5) = −0.5, so h = 1.5.
    # Pair 2: every log-prob equal, so h = 0.
    return SequenceLogps(
        policy_chosen=torch.tensor([-2.0, -1.0], requires_grad=True),
        policy_rejected=torch.tensor([-4.0, -1.0], requires_grad=True),
        reference_chosen=torch.tensor([-3.0, -1.0]),
        reference_rejected=torch.tensor([-3.5, -1.0]),
        chosen_lengths=torch.tensor([4.0, 2.0]),
        rejected_lengths=torch.tensor([5.0, 2.0]),
    )


def test_dpo_loss_value_rewards_and_gradient_match_hand_derivation() -> None:
    logps = _pair_logps()
    output = sigmoid_loss(logps, LossHyperparameters(beta=0.5))
    # −log σ(0.5·1.5) = log(1 + e^−0.75) = 0.386871; −log σ(0) = log 2 = 0.693147.
    assert output.losses.tolist() == pytest.approx([0.386871, 0.693147], abs=1e-6)
    # Implicit rewards β·r: 0.5·1 = 0.5 and 0.5·(−0.5) = −0.25.
    assert output.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert output.rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])
    output.losses.sum().backward()
    # ∂ℓ/∂log π(y_w) = −β·(1 − σ(βh)): −0.5·(1 − σ(0.75)) = −0.160411, and −0.5·0.5 = −0.25 at h = 0;
    # the rejected gradient is the negative of it.
    assert logps.policy_chosen.grad.tolist() == pytest.approx([-0.160411, -0.25], abs=1e-6)
    assert logps.policy_rejected.grad.tolist() == pytest.approx([0.160411, 0.25], abs=1e-6)


def test_dpo_needs_reference_and_rejected_log_probs() -> None:
    logps = SequenceLogps(policy_chosen=torch.tensor([-1.0]), chosen_lengths=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="reference"):
        sigmoid_loss(logps, LossHyperparameters())


def test_sft_loss_is_per_token_negative_log_likelihood() -> None:
    logps = _pair_logps()
    output = sft_loss(logps, LossHyperparameters())
    assert output.losses.tolist() == pytest.approx([0.5, 0.5])  # 2/4 and 1/2
    assert output.chosen_rewards is None


def test_registry_lookup_and_unknown_name_lists_valid_names() -> None:
    assert get_loss("sigmoid") is sigmoid_loss
    assert get_loss("sft") is sft_loss
    with pytest.raises(ValueError) as error:
        get_loss("dpo-typo")
    for name in LOSSES:
        assert name in str(error.value)


def test_rpo_adds_the_weighted_chosen_nll_to_dpo() -> None:
    logps = _pair_logps()
    output = get_loss("rpo")(logps, LossHyperparameters(beta=0.5, nll_weight=1.0))
    # DPO term as above plus η·(−log π(y_w))/|y_w| = 2/4 and 1/2.
    assert output.losses.tolist() == pytest.approx([0.886871, 1.193147], abs=1e-6)
    output.losses.sum().backward()
    # ∂/∂log π(y_w) = −β(1 − σ(βh)) − η/|y_w|: −0.160411 − 0.25 and −0.25 − 0.5.
    assert logps.policy_chosen.grad.tolist() == pytest.approx([-0.410411, -0.75], abs=1e-6)
