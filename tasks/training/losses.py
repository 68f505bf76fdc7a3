"""The loss registry: one small function per training method, looked up by name.

Every loss takes the summed sequence log-probs of a batch (``SequenceLogps``) and the shared
hyperparameters (``LossHyperparameters``), and returns per-example losses plus the implicit rewards
that the training loop reports. Adding a method (cDPO, IPO, SimPO, ...) means adding one function
and one registry entry; the training loop never branches on the loss name.

Notation (see /work/shared/ALGORITHMS.md): r_θ(y) = log π(y|x) − log π_ref(y|x),
h = r_θ(y_w) − r_θ(y_l), ℓ(z) = −log σ(z).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class SequenceLogps:
    """Summed log-probs of whole completions for a batch (all tensors of shape [batch]).

    Preference losses use all fields; likelihood losses (``sft``) only the chosen ones. Reference
    log-probs come from the frozen reference policy and carry no gradient.
    """

    policy_chosen: torch.Tensor
    chosen_lengths: torch.Tensor
    policy_rejected: torch.Tensor | None = None
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """Per-example losses (the loop averages them) and implicit rewards β·r_θ(y), detached.

    Rewards are None for losses that have no reference policy.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None


class LossHyperparameters(BaseModel):
    """Hyperparameters shared by the registered losses; each loss reads the ones it needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(0.1, gt=0.0, description="KL strength β of DPO (Rafailov et al. 2023 default 0.1)")
    nll_weight: float = Field(
        0.005, ge=0.0, description="η of rpo: weight of the chosen NLL term (Liu et al. 2024 range; Pang et al. 2024 use 1)"
    )


LossFunction = Callable[[SequenceLogps, LossHyperparameters], LossOutput]


def _require_preference_inputs(logps: SequenceLogps, loss_name: str) -> None:
    missing = [
        name
        for name in ("policy_rejected", "reference_chosen", "reference_rejected")
        if getattr(logps, name) is None
    ]
    if missing:
        raise ValueError(
            f"loss '{loss_name}' needs rejected and reference log-probs, but {missing} are missing: "
            "train it on preference pairs with a reference policy"
        )


def sigmoid_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", eq. 7:

        loss = −log σ(β·h),   h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    Implicit rewards are β·(log π(y) − log π_ref(y)) for the chosen and the rejected completion.
    """
    _require_preference_inputs(logps, "sigmoid")
    beta = hyperparameters.beta
    chosen_log_ratio = logps.policy_chosen - logps.reference_chosen
    rejected_log_ratio = logps.policy_rejected - logps.reference_rejected
    # logsigmoid is the numerically stable form of log σ for large |β·h|.
    losses = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio))
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_log_ratio).detach(),
        rejected_rewards=(beta * rejected_log_ratio).detach(),
    )


def rpo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """DPO plus the per-token NLL of the chosen completion,

        loss = −log σ(β·h) + η · (−log π(y_w | x) / |y_w|)

    Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
    Adversarial Regularizer" (RPO); with η = 1 it is the objective of Iterative RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") for verifier-labelled reasoning pairs. The NLL term
    keeps DPO from lowering the chosen likelihood together with the rejected one.
    """
    dpo = sigmoid_loss(logps, hyperparameters)
    chosen_nll = -logps.policy_chosen / logps.chosen_lengths.clamp(min=1)
    return LossOutput(
        losses=dpo.losses + hyperparameters.nll_weight * chosen_nll,
        chosen_rewards=dpo.chosen_rewards,
        rejected_rewards=dpo.rejected_rewards,
    )


def sft_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """Supervised fine-tuning: the per-token negative log-likelihood of the target completion,

        loss = −log π(y_w | x) / |y_w|

    the warm start of the loop and the SPIN-style baseline (Chen et al. 2024, "Self-Play Fine-Tuning").
    """
    del hyperparameters  # NLL has no hyperparameters; the signature is shared by the registry.
    return LossOutput(losses=-logps.policy_chosen / logps.chosen_lengths.clamp(min=1))


LOSSES: dict[str, LossFunction] = {
    "sigmoid": sigmoid_loss,
    "rpo": rpo_loss,
    "sft": sft_loss,
}
"""Registered losses by name; ``PREFERENCE_LOSSES`` lists those that need pairs and a reference."""

PREFERENCE_LOSSES: frozenset[str] = frozenset({"sigmoid", "rpo"})


def get_loss(name: str) -> LossFunction:
    """The registered loss function called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}': valid names are {sorted(LOSSES)}") from None
