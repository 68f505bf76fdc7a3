"""The training configs: the shared optimiser settings and what each recipe adds to them.

Light on purpose (pydantic only, no torch): stage configs nest these models, and importing
``prefloop.config`` builds every stage's config without loading any training machinery.

- :class:`OptimizationConfig`: AdamW, warm-up and linear decay, clipping, accumulation, data seed;
- :class:`DistributedConfig` (``training.distributed``): how many data-parallel processes run the loop
  (``tasks/training/distributed.py``). A run option, not part of what is computed: a
  :class:`TrainingStageConfig` leaves it out of the artifact id and the manifest's config;
- :class:`SFTConfig`: the supervised warm start (``recipes/sft.py``);
- :class:`DPOConfig`: preference optimisation with a registered loss (``recipes/dpo.py``);
- :class:`RewardModelTrainingConfig`: Bradley–Terry reward models (``recipes/reward_model.py``);
- :func:`check_iteration_policy`: which losses each iteration policy (``reference_policy``) is defined
  for, checked by the loop config and by stage ``train``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefloop.errors import UserError
from prefloop.stage import StageConfig
from prefloop.tasks.training.losses import LossHyperparameters, get_loss_spec


class DistributedConfig(BaseModel):
    """Data-parallel training: ``processes`` ranks each take 1/processes of every micro-batch, their
    gradients are summed (all-reduce) before clipping, so a step sees the same global batch as one
    process and the weights agree with a one-process run up to float summation order.

    The stage launches the ranks itself (``processes > 1``); a run started by ``accelerate launch`` /
    ``torchrun`` joins the launcher's process group instead (docs/cluster-training.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    processes: int = Field(1, description="data-parallel ranks the stage launches; 1: train in this process")
    backend: Literal["gloo", "nccl"] | None = Field(
        None, description="collective backend; None: nccl where CUDA is available, else gloo (gloo ranks run on CPU)")
    timeout_s: float = Field(
        600.0, gt=0.0, description="seconds a rank waits in a collective (or the launch waits for the ranks to "
        "connect) before it fails: a dead or stuck rank fails the stage instead of hanging it")

    @field_validator("processes")
    @classmethod
    def _at_least_one(cls, processes: int) -> int:
        if processes < 1:
            raise UserError(f"training.distributed.processes is {processes}: it counts the training processes, so "
                            "it must be 1 (train in the stage's own process) or more (data-parallel ranks)")
        return processes


class OptimizationConfig(BaseModel):
    """AdamW with linear warm-up and linear decay to zero, shared by every training method."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(gt=0.0)
    batch_size: int = Field(ge=1, description="examples (SFT) or pairs (DPO) per optimizer step")
    epochs: float = Field(1.0, gt=0.0, description="passes over the data; ignored when max_steps is set")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="None disables clipping")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches of batch_size per optimizer step (effective batch = batch_size × this)"
    )
    max_length: int | None = Field(
        None, ge=2, description="tokens per sequence (prompt + completion + eos), cut from the end; None: no cut"
    )
    checkpoint_every: int | None = Field(
        100, ge=1, description="optimizer steps between checkpoints (when the caller gives a checkpointer); None: never"
    )
    seed: int = Field(0, description="fixes the data order")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="data-parallel processes (a run option: not part of the artifact id, recorded in its metrics)")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _every_process_gets_examples(self) -> OptimizationConfig:
        processes = self.distributed.processes
        if processes > self.batch_size:
            raise UserError(
                f"training.distributed.processes is {processes} but batch_size is {self.batch_size}: every "
                "micro-batch is split across the processes, so some would get no example. Lower processes to "
                f"at most {self.batch_size}, or raise batch_size (and lower gradient_accumulation_steps to keep "
                "the examples per step)")
        return self


class SFTConfig(OptimizationConfig):
    """Supervised warm start. Defaults reach ~98 % on the default arithmetic task (FINDINGS: lr 3e-3,
    batch 64, 50 warm-up steps; the learning curve is a cliff between steps 250 and 500)."""

    learning_rate: float = 3e-3
    batch_size: int = 64
    max_steps: int | None = 600
    warmup_steps: int = 50


class DPOConfig(OptimizationConfig, LossHyperparameters):
    """Preference optimisation with a registered loss (``sigmoid`` = DPO, Rafailov et al. 2023).

    The loss hyperparameters (β, ε of cdpo/rdpo, IPO's τ, SimPO's β and γ, TDPO's α, ...,
    ``length_normalize``) are the flat fields of ``LossHyperparameters``, with the papers' defaults.

    Defaults follow the paper (β = 0.1) with a small learning rate: with plain DPO on the 1 M-parameter
    embedded model, 1e-5 and above collapse accuracy within a round (FINDINGS). The embedded demo
    uses ``loss="rpo", nll_weight=1.0, beta=0.5, learning_rate=1e-4, epochs=2`` instead: the chosen
    NLL term keeps the higher rate stable (benchmarks/demo_sizing.py).
    """

    loss: str = Field("sigmoid", description="a registered loss name (tasks/training/losses.py)")
    learning_rate: float = 3e-6
    batch_size: int = 32
    epochs: float = 1.0

    @field_validator("loss")
    @classmethod
    def _registered_loss(cls, name: str) -> str:
        get_loss_spec(name)  # an unknown name fails here, with the list of valid names
        return name

    def loss_hyperparameters(self) -> LossHyperparameters:
        return LossHyperparameters(**self.model_dump(include=set(LossHyperparameters.model_fields)))


class RewardModelTrainingConfig(OptimizationConfig):
    """Bradley–Terry training with the shared optimiser (AdamW, warm-up, linear decay, clipping).

    Ouyang et al. 2022 train large reward models for one epoch (more overfit them). A tiny reward
    model learning from scratch needs more: on the embedded task benchmarks/reward_model.py measured
    ~60 % held-out pairwise accuracy after 2 epochs and ~72 % after 4 at lr 3e-3 (fresh 64-wide,
    2-layer Llama), so those are the defaults; lower both when starting from a trained policy.
    """

    learning_rate: float = 3e-3
    batch_size: int = 32
    epochs: float = 4.0
    warmup_steps: int = 10
    center_rewards_coefficient: float = Field(
        0.0, ge=0.0, description="c of the reward-centring term c·(r_w + r_l)² (Eisenstein et al. 2023); 0: off")

    @model_validator(mode="after")
    def _no_truncation(self) -> RewardModelTrainingConfig:
        if self.max_length is not None:
            raise UserError("max_length is not supported for reward models: the reward is read on the last token, "
                             "which cutting the sequence would remove; leave max_length unset")
        return self


def check_iteration_policy(reference_policy: str, loss: str) -> None:
    """Refuse an iteration policy combined with a loss it is not defined for, saying why and what to set.

    - ``mixture`` is INPO's reference (Zhang et al. 2024, "Iterative Nash Policy Optimization"),
      and INPO's loss is the squared (IPO-form) one on it:

          loss = (h_mix − 1/(2η))²,   h_mix the log-ratio margin against π_SFT^(τ/η) · π_t^(1 − τ/η),

      i.e. loss ``ipo`` with ``ipo_tau = η`` and ``train.mixture_weight = τ/η``. With any other loss the
      mixture is a reference no paper defines.
    - ``sppo`` (Wu et al. 2024) is the step π_{t+1} ∝ π_t·exp(η·P(y ≻ π_t)): its log-ratios are against
      π_t, the previous round's policy, so it needs ``previous_round``.
    - ``soft_sync`` (TR-DPO, Gorbatovski et al. 2024) moves a reference that a reference-free loss (simpo)
      never reads.
    """
    spec = get_loss_spec(loss)
    if reference_policy == "mixture" and loss != "ipo":
        raise UserError(
            f"reference_policy 'mixture' with loss '{loss}': the geometric mixture is INPO's reference and INPO's "
            "loss is the squared IPO form (h − 1/(2η))² on it, not another loss. For INPO set train.training.loss: "
            "ipo, train.training.ipo_tau: η and train.mixture_weight: τ/η; to keep loss "
            f"'{loss}', pick reference_policy fixed or previous_round"
        )
    if loss == "sppo" and reference_policy != "previous_round":
        raise UserError(
            f"loss 'sppo' with reference_policy '{reference_policy}': SPPO's update π_t+1 ∝ π_t·exp(η·P(y ≻ π_t)) "
            "regresses log π/π_t, so its reference must be the previous round's policy. Set reference_policy: "
            "previous_round, or use another loss"
        )
    if reference_policy == "soft_sync" and not spec.needs_reference:
        raise UserError(
            f"reference_policy 'soft_sync' with loss '{loss}': TR-DPO moves the reference during training, but "
            f"'{loss}' has no reference to move. Set reference_policy: fixed, or use a loss with a reference "
            "(sigmoid, ipo, ...)"
        )


# The run options of a training config: how the training is executed, not what it computes.
RUN_OPTIONS: dict[str, Any] = {"training": {"distributed"}}


class TrainingStageConfig(StageConfig):
    """A training stage's config: ``training.distributed`` is a run option (:class:`prefloop.stage.StageConfig`),
    left out of the artifact id and the manifest's config, so a 2-process run has the one-process run's id
    (same global batch, same result up to float summation order); the process count is recorded in the
    model's metrics (``distributed_processes``)."""

    run_options = RUN_OPTIONS
