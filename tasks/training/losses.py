"""The loss registry: one small function per training method, looked up by name.

Every loss takes the summed sequence log-probs of a batch (``SequenceLogps``) and the shared
hyperparameters (``LossHyperparameters``), and returns per-example losses plus the implicit rewards
that the training loop reports. Each registered loss carries a ``LossSpec`` that says what it needs
(reference log-probs, a rejected completion, the token-level KL to the reference, a label-flip rate),
so the training loop asks the spec and never branches on the loss name. Adding a method means adding
one function under ``@_register``. A name stands for a paper's method only if it is that method:
``xpo`` and ``hypo`` were removed (``REMOVED_LOSSES`` says why and what to use), and asking for them
is refused rather than silently training something else.

Notation (see /work/shared/ALGORITHMS.md): r_θ(y) = log π(y|x) − log π_ref(y|x),
h = r_θ(y_w) − r_θ(y_l), ℓ(z) = −log σ(z). With ``length_normalize`` every log-ratio (and TDPO's
sequence KL) is divided by its completion length, r_θ(y)/|y| (length-normalised DPO, Tülu 3), for
every loss that has a reference; the NLL terms are per token already and SimPO is normalised by
definition, so the flag does not touch them.

Light to import (torch deferred): ``DPOConfig`` inherits ``LossHyperparameters``.

Over 400 lines: the registry and its ten small loss functions are read side by side, each with its
formula and paper; splitting them would separate a loss from the spec that says what it needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefloop.errors import UserError
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch
else:
    torch = deferred_import("torch")


REMOVED_LOSSES: dict[str, str] = {
    "xpo": "removed: it was not the paper's method. XPO (Xie et al. 2024, Algorithm 1) adds α·log π(ỹ) for a "
    "sample ỹ drawn from π_ref regardless of the pair's label; prefloop's 'xpo' put that term on the pair's "
    "rejected completion, which only pushes the loser down a little more (issue 17, item 5). Use loss sigmoid "
    "(or rpo, DPO plus the chosen NLL) on the round's fresh samples",
    "hypo": "removed: it was not the paper's method. HyPO (Song et al. 2024, Algorithm 1) estimates KL(π‖π_ref) "
    "on fresh samples of the policy being trained; prefloop's 'hypo' used the round's stale worst-of-n rejected "
    "completion (issue 17, item 5). Use loss tdpo (the token-level KL to the reference, computed exactly on the "
    "pairs) or sigmoid with a larger beta for a tighter KL",
}
"""Loss names that once were registered, with why they went and what to use instead; asking for one is refused
with that text (``get_loss_spec``), so an old config fails loudly instead of training something else."""

REMOVED_HYPERPARAMETERS: dict[str, str] = {"xpo_alpha": "xpo", "hypo_lambda": "hypo"}
"""Hyperparameters of the removed losses, refused by name with the loss's removal note."""


@dataclass(frozen=True)
class SequenceLogps:
    """Summed log-probs of whole completions for a batch (all tensors of shape [batch]).

    Preference losses use the rejected and reference fields; likelihood losses (``sft``) only the
    chosen ones. Reference log-probs come from the frozen reference policy and carry no gradient.

    Optional inputs that only some losses read (the loss's ``LossSpec`` says which):

    - ``label_flip_rate``: per-pair probability ε that the pair's label is wrong (cdpo, rdpo), e.g.
      ε = min(1 − conf, 0.5) from MCTS visit counts; overrides the global ``label_flip_rate``.
    - ``chosen_kl`` / ``rejected_kl``: the sequence KL of TDPO, Σ_t KL(π_ref(·|x, y_<t) ‖ π(·|x, y_<t))
      summed over the completion positions, each term over the whole vocabulary (not just the sampled
      token), differentiable w.r.t. the policy. ``prefloop.forward.completion_logps_and_kl`` computes it
      from logits.
    """

    policy_chosen: torch.Tensor
    chosen_lengths: torch.Tensor
    policy_rejected: torch.Tensor | None = None
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    label_flip_rate: torch.Tensor | None = None
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """Per-example losses (the loop averages them) and the method's implicit rewards, detached.

    Rewards are β·r_θ(y) for the losses with a reference (β/|y|·log π(y) for SimPO) and None for
    ``sft``, which has no reward.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None


class LossHyperparameters(BaseModel):
    """Hyperparameters of the registered losses, with the papers' defaults; each loss reads its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(
        0.1, gt=0.0, description="KL strength β of DPO and its relatives (Rafailov et al. 2023 default 0.1)"
    )
    nll_weight: float = Field(
        0.005,
        ge=0.0,
        description="η of rpo: weight of the chosen NLL term (Liu et al. 2024 range; Pang et al. 2024 use 1)",
    )
    length_normalize: bool = Field(
        False,
        description="divide each log-ratio by its completion length, r_θ(y)/|y| (length-normalised DPO, Tülu 3)",
    )
    label_flip_rate: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="ε of cdpo and rdpo: probability that a pair's label is flipped; rdpo takes the filter "
        "stage's flip-rate estimate (Mitchell 2023 and Chowdhury et al. 2024 use 0.1); per-pair values "
        "override it",
    )
    ipo_tau: float = Field(
        0.1, gt=0.0, description="τ of ipo: the target margin is 1/(2τ) (Azar et al. 2023)"
    )
    simpo_beta: float = Field(
        2.5, gt=0.0, description="β of simpo, the reward scale (Meng et al. 2024: 2.0–2.5)"
    )
    simpo_gamma: float = Field(
        1.375, ge=0.0, description="γ of simpo, the target reward margin (Meng et al. 2024)"
    )
    sppo_eta: float | None = Field(
        None,
        gt=0.0,
        description="η of sppo, the scale of the target log-ratios ±η/2; None means 1/β (TRL's sppo_hard)",
    )
    tdpo_alpha: float = Field(
        0.5,
        ge=0.0,
        description="α of tdpo: weight of the token-level KL difference (Zeng et al. 2024, TDPO2)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_removed_hyperparameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, loss in REMOVED_HYPERPARAMETERS.items():
                if name in data:
                    raise UserError(f"{name} was the hyperparameter of loss '{loss}', which was {REMOVED_LOSSES[loss]}; "
                                    f"delete {name} from the config")
        return data


LossFunction = Callable[[SequenceLogps, LossHyperparameters], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """What a registered loss needs, so the trainer can prepare its inputs without knowing its name.

    ``needs_kl_to_reference``: the trainer must run the reference on every batch and fill
    ``chosen_kl``/``rejected_kl`` (TDPO). ``uses_label_flip_rate``: the loss reads ε, globally or per pair;
    ``label_flip_rate_may_be_half``: ε = 0.5 (a label that carries no information) is valid (cdpo), else ε
    must stay below 0.5 (rdpo divides by 1 − 2ε).
    """

    name: str
    function: LossFunction
    needs_reference: bool
    needs_rejected: bool
    needs_kl_to_reference: bool = False
    uses_label_flip_rate: bool = False
    label_flip_rate_may_be_half: bool = False

    def required_fields(self) -> tuple[str, ...]:
        required: list[str] = []
        if self.needs_rejected:
            required += ["policy_rejected", "rejected_lengths"]
        if self.needs_reference:
            required += ["reference_chosen"] + (["reference_rejected"] if self.needs_rejected else [])
        if self.needs_kl_to_reference:
            required += ["chosen_kl", "rejected_kl"]
        return tuple(required)

    def check_inputs(self, logps: SequenceLogps) -> None:
        """Raise a ValueError naming the missing inputs and how to provide them."""
        missing = [name for name in self.required_fields() if getattr(logps, name) is None]
        if not missing:
            return
        how = []
        if self.needs_rejected:
            how.append("train it on preference pairs (train_dpo), not on single completions")
        if self.needs_reference:
            how.append("give it the reference policy's log-probs")
        if self.needs_kl_to_reference:
            how.append(
                "fill chosen_kl/rejected_kl with prefloop.forward.completion_logps_and_kl (the trainer does when the spec asks)"
            )
        raise UserError(
            f"loss '{self.name}' needs {list(self.required_fields())}, but {missing} are missing: "
            + "; ".join(how)
        )

    def __call__(self, logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
        return self.function(logps, hyperparameters)


LOSSES: dict[str, LossFunction] = {}
"""Registered loss functions by name (each checks its inputs first); ``LOSS_SPECS`` holds what each needs."""

LOSS_SPECS: dict[str, LossSpec] = {}


def _register(
    name: str,
    *,
    needs_reference: bool,
    needs_rejected: bool = True,
    needs_kl_to_reference: bool = False,
    uses_label_flip_rate: bool = False,
    label_flip_rate_may_be_half: bool = False,
) -> Callable[[LossFunction], LossFunction]:
    """Register a loss under ``name``; the registered function checks its inputs against the spec first."""

    def register(function: LossFunction) -> LossFunction:
        spec_fields = {
            "name": name,
            "needs_reference": needs_reference,
            "needs_rejected": needs_rejected,
            "needs_kl_to_reference": needs_kl_to_reference,
            "uses_label_flip_rate": uses_label_flip_rate,
            "label_flip_rate_may_be_half": label_flip_rate_may_be_half,
        }

        @functools.wraps(function)
        def checked(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
            LOSS_SPECS[name].check_inputs(logps)
            return function(logps, hyperparameters)

        if name in LOSSES:
            raise ValueError(f"loss '{name}' is registered twice")
        LOSSES[name] = checked
        LOSS_SPECS[name] = LossSpec(function=checked, **spec_fields)
        return checked

    return register


def _log_ratios(
    logps: SequenceLogps, hyperparameters: LossHyperparameters
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_θ(y_w) and r_θ(y_l), divided by the completion lengths when ``length_normalize`` is set."""
    chosen = logps.policy_chosen - logps.reference_chosen
    rejected = logps.policy_rejected - logps.reference_rejected
    if hyperparameters.length_normalize:
        chosen = chosen / logps.chosen_lengths.clamp(min=1)
        rejected = rejected / logps.rejected_lengths.clamp(min=1)
    return chosen, rejected


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {"chosen_rewards": (scale * chosen).detach(), "rejected_rewards": (scale * rejected).detach()}


def _label_flip_rate(
    logps: SequenceLogps,
    hyperparameters: LossHyperparameters,
    loss_name: str,
) -> torch.Tensor | float:
    """The per-pair ε when given, else the global one; checked to lie in [0, 0.5], or [0, 0.5) when the
    loss's spec does not allow ε = 0.5."""
    upper, upper_included = 0.5, LOSS_SPECS[loss_name].label_flip_rate_may_be_half
    if logps.label_flip_rate is None:
        epsilon = hyperparameters.label_flip_rate
        if epsilon > upper or (epsilon == upper and not upper_included):
            raise UserError(f"loss '{loss_name}' needs label_flip_rate below {upper}, got {epsilon}")
        return epsilon
    epsilon = logps.label_flip_rate
    above = epsilon > upper if upper_included else epsilon >= upper
    if bool((epsilon < 0).any()) or bool(above.any()):
        bound = "]" if upper_included else ")"
        raise UserError(
            f"loss '{loss_name}' needs every per-pair label_flip_rate in [0, {upper}{bound}, got values "
            f"{epsilon[(epsilon < 0) | above].tolist()}: clamp the pairs' ε (e.g. ε = min(1 − confidence, 0.5))"
        )
    return epsilon


@_register("sigmoid", needs_reference=True)
def sigmoid_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", eq. 7:

        loss = −log σ(β·h),   h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    Implicit rewards are β·(log π(y) − log π_ref(y)) for the chosen and the rejected completion.
    """
    chosen, rejected = _log_ratios(logps, hyperparameters)
    beta = hyperparameters.beta
    # logsigmoid is the numerically stable form of log σ for large |β·h|.
    losses = -torch.nn.functional.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses=losses, **_rewards(chosen, rejected, beta))


@_register("cdpo", needs_reference=True, uses_label_flip_rate=True, label_flip_rate_may_be_half=True)
def conservative_dpo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """Conservative DPO (label smoothing), Mitchell 2023, "A note on DPO with noisy preferences &
    relationship to IPO":

        loss = (1 − ε)·ℓ(β·h) + ε·ℓ(−β·h)

    the DPO loss against a target that believes the label with probability 1 − ε. ε is global
    (``label_flip_rate``) or per pair (``SequenceLogps.label_flip_rate``, e.g. MCTS-DPO's
    ε = min(1 − conf, 0.5) from visit counts, Xie et al. 2024), each in [0, 0.5].
    """
    epsilon = _label_flip_rate(logps, hyperparameters, "cdpo")
    chosen, rejected = _log_ratios(logps, hyperparameters)
    logits = hyperparameters.beta * (chosen - rejected)
    losses = -(1 - epsilon) * torch.nn.functional.logsigmoid(logits) - epsilon * torch.nn.functional.logsigmoid(-logits)
    return LossOutput(losses=losses, **_rewards(chosen, rejected, hyperparameters.beta))


@_register("rdpo", needs_reference=True, uses_label_flip_rate=True)
def robust_dpo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback":

        loss = [(1 − ε)·ℓ(β·h) − ε·ℓ(−β·h)] / (1 − 2ε)

    an unbiased estimate of the clean DPO loss when each label is flipped with probability ε < 1/2;
    ε is the filter stage's flip-rate estimate (global ``label_flip_rate``) or given per pair.
    """
    epsilon = _label_flip_rate(logps, hyperparameters, "rdpo")
    chosen, rejected = _log_ratios(logps, hyperparameters)
    logits = hyperparameters.beta * (chosen - rejected)
    losses = (-(1 - epsilon) * torch.nn.functional.logsigmoid(logits) + epsilon * torch.nn.functional.logsigmoid(-logits)) / (1 - 2 * epsilon)
    return LossOutput(losses=losses, **_rewards(chosen, rejected, hyperparameters.beta))


@_register("ipo", needs_reference=True)
def ipo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17:

        loss = (h − 1/(2τ))²

    a squared loss that pulls the log-ratio margin to 1/(2τ) instead of pushing it to infinity. TRL
    divides each log-ratio by its length for IPO (the form the IPO authors confirmed): set
    ``length_normalize`` for that. Rewards are reported as τ·r_θ(y).

    INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization") is this loss against the
    geometric-mixture reference π_ref^(τ/η)·π_t^(1−τ/η) with target 1/(2η): ``reference_policy:
    mixture``, ``mixture_weight = τ/η``, ``ipo_tau = η`` (``configs.check_iteration_policy``).
    """
    chosen, rejected = _log_ratios(logps, hyperparameters)
    tau = hyperparameters.ipo_tau
    losses = (chosen - rejected - 1 / (2 * tau)) ** 2
    return LossOutput(losses=losses, **_rewards(chosen, rejected, tau))


@_register("hinge", needs_reference=True)
def hinge_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """Hinge loss on the DPO margin, as in SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback") with the reference ratio of RSO (Liu et al. 2024, "Statistical
    Rejection Sampling Improves Preference Optimization"):

        loss = max(0, 1 − β·h)
    """
    chosen, rejected = _log_ratios(logps, hyperparameters)
    beta = hyperparameters.beta
    losses = torch.relu(1 - beta * (chosen - rejected))
    return LossOutput(losses=losses, **_rewards(chosen, rejected, beta))


@_register("simpo", needs_reference=False)
def simpo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward":

        loss = −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)

    No reference policy: the implicit reward is the length-normalised log-likelihood β/|y|·log π(y),
    so SimPO is length-normalised by definition and ``length_normalize`` does not change it.
    """
    beta = hyperparameters.simpo_beta
    chosen = logps.policy_chosen / logps.chosen_lengths.clamp(min=1)
    rejected = logps.policy_rejected / logps.rejected_lengths.clamp(min=1)
    losses = -torch.nn.functional.logsigmoid(beta * (chosen - rejected) - hyperparameters.simpo_gamma)
    return LossOutput(losses=losses, **_rewards(chosen, rejected, beta))


@_register("rpo", needs_reference=True)
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


@_register("sppo", needs_reference=True)
def sppo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """SPPO with hard win-probabilities, Wu et al. 2024, "Self-Play Preference Optimization for
    Language Model Alignment", eq. 4.7 with P(y_w ≻ π) = 1 and P(y_l ≻ π) = 0:

        loss = (r_θ(y_w) − η/2)² + (r_θ(y_l) + η/2)²

    each completion's log-ratio is regressed on η·(P − 1/2). η defaults to 1/β, as TRL's ``sppo_hard``.
    SPPO's iteration π_{t+1} ∝ π_t·exp(η·P(y ≻ π_t)) needs π_ref = π_t, the previous round's policy: a loop
    or train config pairing it with another ``reference_policy`` is refused (``configs.check_iteration_policy``).
    """
    chosen, rejected = _log_ratios(logps, hyperparameters)
    beta = hyperparameters.beta
    eta = hyperparameters.sppo_eta if hyperparameters.sppo_eta is not None else 1 / beta
    losses = (chosen - eta / 2) ** 2 + (rejected + eta / 2) ** 2
    return LossOutput(losses=losses, **_rewards(chosen, rejected, beta))


@_register("tdpo", needs_reference=True, needs_kl_to_reference=True)
def tdpo_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """TDPO2, Zeng et al. 2024, "Token-level Direct Preference Optimization":

        loss = −log σ(β·h − α·(β·D(y_l) − sg(β·D(y_w)))),
        D(y) = Σ_t KL(π_ref(·|x, y_<t) ‖ π(·|x, y_<t))   (the sequential KL over the completion)

    sg is stop-gradient: only the rejected completion's KL is pushed up by the gradient, which
    controls the KL on the chosen side as the paper's TDPO2 does. α = 0.5 is the paper's default.
    """
    chosen, rejected = _log_ratios(logps, hyperparameters)
    chosen_kl, rejected_kl = logps.chosen_kl, logps.rejected_kl
    if hyperparameters.length_normalize:
        chosen_kl = chosen_kl / logps.chosen_lengths.clamp(min=1)
        rejected_kl = rejected_kl / logps.rejected_lengths.clamp(min=1)
    beta = hyperparameters.beta
    kl_difference = beta * rejected_kl - (beta * chosen_kl).detach()
    losses = -torch.nn.functional.logsigmoid(beta * (chosen - rejected) - hyperparameters.tdpo_alpha * kl_difference)
    return LossOutput(losses=losses, **_rewards(chosen, rejected, beta))


@_register("sft", needs_reference=False, needs_rejected=False)
def sft_loss(logps: SequenceLogps, hyperparameters: LossHyperparameters) -> LossOutput:
    """Supervised fine-tuning: the per-token negative log-likelihood of the target completion,

        loss = −log π(y_w | x) / |y_w|

    the warm start of the loop and the SPIN-style baseline (Chen et al. 2024, "Self-Play Fine-Tuning").
    """
    del hyperparameters  # NLL has no hyperparameters; the signature is shared by the registry.
    return LossOutput(losses=-logps.policy_chosen / logps.chosen_lengths.clamp(min=1))


PREFERENCE_LOSSES: frozenset[str] = frozenset(
    name for name, spec in LOSS_SPECS.items() if spec.needs_rejected
)
"""Losses that train on (chosen, rejected) pairs, i.e. the ones ``train_dpo`` accepts."""


def get_loss_spec(name: str) -> LossSpec:
    """The ``LossSpec`` registered as ``name``; a removed name is refused with why and what to use instead,
    any other unknown name with the list of valid names (both ValueErrors)."""
    if name in REMOVED_LOSSES:
        raise UserError(f"loss '{name}' was {REMOVED_LOSSES[name]}")
    try:
        return LOSS_SPECS[name]
    except KeyError:
        raise UserError(f"unknown loss '{name}': valid names are {sorted(LOSS_SPECS)}") from None


def get_loss(name: str) -> LossFunction:
    """The registered loss function called ``name``; a ValueError lists the valid names otherwise."""
    return get_loss_spec(name).function
