"""Recipe: preference optimisation with a registered DPO-family loss, and the reference it trains against.

Per step, the chosen and rejected rows of the batch go through the policy together, each pair as
one row with its shared prefix run once (:func:`prefloop.forward.pair_sequence_logprobs`); the
registered ``config.loss`` turns the sequence log-probs into per-pair losses; the shared loop steps.

Reference log-probs: the reference is frozen, so its sequence log-probs are computed once per
round (:func:`reference_logprobs`, stored by the ``reference`` stage as an artifact keyed by
pair_id) instead of a reference forward pass every step. Only a reference that changes during
training (TR-DPO's :class:`SoftSync`) or a loss that needs the reference's whole token distribution
(TDPO) runs the reference model per step. :func:`geometric_mixture` gives INPO's mixed reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefloop.errors import UserError
from prefloop.forward import (
    INFERENCE_GROUP_TOKENS,
    EncodedExample,
    collate,
    completion_lengths,
    encode_examples,
    logps_and_kl_to_reference,
    pair_sequence_logprobs,
    sampled_completion_ids,
)
from prefloop.lazy import deferred_import
from prefloop.tasks.training.configs import DPOConfig
from prefloop.tasks.training.losses import LossOutput, SequenceLogps, get_loss_spec
from prefloop.tasks.training.optim import example_order, num_steps_for, optimise

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from prefloop.backends.base import ProgressCallback
    from prefloop.tasks.training.distributed import DataParallel
    from prefloop.tasks.training.optim import Checkpointer, MetricValue
else:
    torch = deferred_import("torch")


@dataclass(frozen=True)
class PreparedPairs:
    """Tokenised (prompt, chosen, rejected) triples, chosen[i] and rejected[i] of pair i.

    ``label_flip_rates`` (float32, shape [pairs]) is each pair's probability ε that its label is wrong,
    for the losses that read ε per pair (cdpo, rdpo: ``SequenceLogps.label_flip_rate``); None: the
    loss's global ``label_flip_rate``.
    """

    chosen: list[EncodedExample]
    rejected: list[EncodedExample]
    label_flip_rates: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)


def prepare_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    max_length: int | None = None,
    label_flip_rates: Sequence[float] | None = None,
    chosen_ids: Sequence[Sequence[int] | None] | None = None,
    rejected_ids: Sequence[Sequence[int] | None] | None = None,
) -> PreparedPairs:
    """Tokenise preference triples once, for the reference pass and for training; ``label_flip_rates``
    (one ε per pair) travel with them to the loss. ``chosen_ids`` / ``rejected_ids``: the sampled ids of
    each side where they are valid for ``tokenizer`` (:func:`pair_completion_ids`), used instead of
    re-encoding that side's text."""
    prompts = [prompt for prompt, _, _ in pairs]
    if label_flip_rates is not None and len(label_flip_rates) != len(pairs):
        raise ValueError(f"got {len(label_flip_rates)} label flip rates for {len(pairs)} pairs: give one per pair")
    return PreparedPairs(
        chosen=encode_examples(tokenizer, prompts, [chosen for _, chosen, _ in pairs], max_length,
                               completion_ids=chosen_ids),
        rejected=encode_examples(tokenizer, prompts, [rejected for _, _, rejected in pairs], max_length,
                                 completion_ids=rejected_ids),
        label_flip_rates=(torch.tensor(label_flip_rates, dtype=torch.float32)
                          if label_flip_rates is not None else None),
    )


PAIR_TOKEN_ID_COLUMNS = ("chosen_token_ids", "rejected_token_ids", "tokenizer_fingerprint")


def pair_completion_ids(
    tokenizer: PreTrainedTokenizerBase, table: pa.Table
) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """The sampled ids of each pair's chosen and rejected completion that a model with ``tokenizer`` may
    use: those whose ``tokenizer_fingerprint`` is this tokenizer's; None (re-encode the text) for pairs
    without ids (imported, tree search, older artifacts) or sampled by a model with another vocabulary
    (:func:`prefloop.forward.sampled_completion_ids`). The train and reference stages both call it, so
    they tokenise every pair alike."""
    if any(name not in table.column_names for name in PAIR_TOKEN_ID_COLUMNS):
        return [None] * table.num_rows, [None] * table.num_rows
    fingerprints = table.column("tokenizer_fingerprint").to_pylist()
    return (sampled_completion_ids(tokenizer, table.column("chosen_token_ids").to_pylist(), fingerprints),
            sampled_completion_ids(tokenizer, table.column("rejected_token_ids").to_pylist(), fingerprints))


@dataclass(frozen=True)
class ReferenceLogps:
    """Σ log π_ref over the chosen and the rejected completion of each pair (float32, shape [pairs])."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)


def reference_logprobs(
    reference: PreTrainedModel, prepared: PreparedPairs, pad_id: int = 0, max_tokens: int = INFERENCE_GROUP_TOKENS
) -> ReferenceLogps:
    """Sequence log-probs of every pair's chosen and rejected completion under the frozen reference,
    computed once (no gradients), all rows in length groups across the whole data set."""
    reference.eval()
    with torch.inference_mode():
        chosen, rejected = pair_sequence_logprobs(reference, prepared.chosen, prepared.rejected, pad_id, max_tokens)
    return ReferenceLogps(chosen=chosen.clone(), rejected=rejected.clone())


def geometric_mixture(first: ReferenceLogps, second: ReferenceLogps, first_weight: float) -> ReferenceLogps:
    """Sequence log-probs of the geometric mixture π_mix ∝ π_1^w · π_2^(1−w):

        log π_mix(y|x) = w · log π_1(y|x) + (1 − w) · log π_2(y|x) − log Z(x)

    The normaliser Z(x) depends on the prompt only, so it cancels in every DPO-family log-ratio
    difference h and is left out. INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization")
    uses this reference with π_1 = the SFT model, π_2 = the previous round's policy, w = τ/η.
    """
    if not 0.0 <= first_weight <= 1.0:
        raise UserError(f"a geometric mixture weight must lie in [0, 1], got {first_weight}")
    if len(first) != len(second):
        raise ValueError(f"cannot mix reference log-probs of {len(first)} and {len(second)} pairs")
    return ReferenceLogps(
        chosen=first_weight * first.chosen + (1.0 - first_weight) * second.chosen,
        rejected=first_weight * first.rejected + (1.0 - first_weight) * second.rejected,
    )


@dataclass(frozen=True)
class SoftSync:
    """TR-DPO's soft reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
    Good Alignment"): every ``every`` optimizer steps, π_ref ← α·π_θ + (1 − α)·π_ref, parameter-wise."""

    alpha: float
    every: int

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0 or self.every < 1:
            raise UserError(f"soft sync needs 0 < alpha <= 1 and every >= 1, got alpha={self.alpha}, every={self.every}")

    def apply(self, policy: PreTrainedModel, reference: PreTrainedModel) -> None:
        with torch.no_grad():
            for reference_parameter, parameter in zip(reference.parameters(), policy.parameters(), strict=True):
                reference_parameter.lerp_(parameter, self.alpha)


def _preference_metrics(output: LossOutput, logps: SequenceLogps) -> dict[str, MetricValue]:
    """Mean implicit rewards, their margin, the share of pairs where chosen out-rewards rejected, and a
    KL estimate: the mean sequence log-ratio log π(y) − log π_ref(y) over the batch's completions (an
    estimate of KL(π‖π_ref) when the completions were sampled from π, i.e. on-policy pairs)."""
    metrics: dict[str, MetricValue] = {}
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    if chosen is not None and rejected is not None:
        metrics |= {
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "reward_accuracy": (chosen > rejected).float().mean(),
        }
    if logps.reference_chosen is not None and logps.reference_rejected is not None:
        log_ratios = torch.cat([logps.policy_chosen - logps.reference_chosen,
                                logps.policy_rejected - logps.reference_rejected]).detach()
        metrics["kl_estimate"] = log_ratios.mean()
    return metrics


def train_dpo(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    config: DPOConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    reference_logps: ReferenceLogps | None = None,
    prepared: PreparedPairs | None = None,
    fixed_order: Sequence[int] | None = None,
    soft_sync: SoftSync | None = None,
    checkpointer: Checkpointer | None = None,
    data_parallel: DataParallel | None = None,
) -> list[dict[str, float]]:
    """Train ``policy`` in place on (prompt, chosen, rejected) triples against a reference.

    Per step, the chosen and rejected rows of the batch go through the policy together (in length
    groups); the loss is the registered ``config.loss`` (default ``sigmoid`` = DPO). Metrics per step
    include the loss, the implicit-reward margin β·h, the implicit-reward accuracy (share of pairs with
    h > 0) and a KL estimate.

    The reference enters as ``reference_logps`` (computed once per round, e.g. by the ``reference``
    stage) or, when they are not given, as log-probs computed here once from ``reference``. With
    ``soft_sync`` (TR-DPO) the reference model changes every k steps, so its log-probs are computed per
    step. ``fixed_order`` is the order of the pairs in every epoch (:func:`example_order`);
    ``prepared`` skips tokenising again; ``checkpointer`` makes the run resumable; ``data_parallel``: this
    process is one rank of a data-parallel run (``tasks/training/distributed.py``).
    """
    config = config or DPOConfig()
    loss_spec = get_loss_spec(config.loss)
    if not loss_spec.needs_rejected:
        raise UserError(f"train_dpo needs a preference loss, got '{config.loss}' (use train_sft for it)")
    if not pairs:
        raise UserError("train_dpo got no pairs: every prompt was all-correct or all-wrong?")
    prepared = prepared or prepare_pairs(tokenizer, pairs, config.max_length)
    if len(prepared) != len(pairs):
        raise ValueError(f"prepared pairs hold {len(prepared)} pairs but {len(pairs)} were given")
    pad_id = tokenizer.pad_token_id
    per_step_reference = soft_sync is not None or loss_spec.needs_kl_to_reference
    if (per_step_reference or (loss_spec.needs_reference and reference_logps is None)) and reference is None:
        raise UserError(
            f"loss '{config.loss}'{' with a soft-synced reference' if soft_sync else ''} needs the reference "
            "model: pass reference= (or reference_logps= computed once for a fixed reference)"
        )
    if soft_sync is not None:
        reference_logps = None  # the reference moves during training: scored per step below
    elif loss_spec.needs_reference and reference_logps is None:
        reference_logps = reference_logprobs(reference, prepared, pad_id)
    if reference_logps is not None and len(reference_logps) != len(pairs):
        raise ValueError(f"reference log-probs cover {len(reference_logps)} pairs but {len(pairs)} were given")
    if reference_logps is not None:
        reference_logps = ReferenceLogps(reference_logps.chosen.to(policy.device), reference_logps.rejected.to(policy.device))
    if per_step_reference:
        reference.eval()
    hyperparameters = config.loss_hyperparameters()
    chosen, rejected = prepared.chosen, prepared.rejected
    flip_rates = prepared.label_flip_rates
    if flip_rates is not None:
        if not loss_spec.uses_label_flip_rate:
            raise UserError(f"per-pair label flip rates were given but loss '{config.loss}' does not read ε: "
                             "use cdpo or rdpo, or leave the rates out")
        flip_rates = flip_rates.to(policy.device)

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        count = len(indices)
        rows = [chosen[i] for i in indices] + [rejected[i] for i in indices]
        kl = None  # Σ_t KL(π_ref‖π), only for losses whose spec asks for it (TDPO)
        if loss_spec.needs_kl_to_reference:
            batch = collate(rows, pad_id)
            policy_logps, kl = logps_and_kl_to_reference(policy, reference, batch)
        else:
            policy_logps = torch.cat(pair_sequence_logprobs(policy, rows[:count], rows[count:], pad_id))
        lengths = completion_lengths(rows).to(policy.device)
        if reference_logps is not None:
            reference_chosen, reference_rejected = reference_logps.chosen[indices], reference_logps.rejected[indices]
        elif loss_spec.needs_reference:
            with torch.no_grad():
                reference_chosen, reference_rejected = pair_sequence_logprobs(reference, rows[:count], rows[count:],
                                                                              pad_id)
        else:
            reference_chosen = reference_rejected = None
        logps = SequenceLogps(
            policy_chosen=policy_logps[:count],
            policy_rejected=policy_logps[count:],
            reference_chosen=reference_chosen,
            reference_rejected=reference_rejected,
            chosen_lengths=lengths[:count],
            rejected_lengths=lengths[count:],
            chosen_kl=kl[:count] if kl is not None else None,
            rejected_kl=kl[count:] if kl is not None else None,
            label_flip_rate=flip_rates[indices] if flip_rates is not None else None,
        )
        output = loss_spec(logps, hyperparameters)
        return output.losses.mean(), _preference_metrics(output, logps)

    num_steps = num_steps_for(len(pairs), config)
    order = example_order(len(pairs), config.examples_per_step, num_steps, config.seed, fixed_order)
    extra_state: dict[str, torch.nn.Module] = {}
    after_step = None
    if soft_sync is not None:
        extra_state["reference"] = reference

        def after_step(step: int) -> None:
            if step % soft_sync.every == 0:
                soft_sync.apply(policy, reference)

    return optimise(policy, len(pairs), config, loss_for_batch, progress, checkpointer=checkpointer, order=order,
                    extra_state=extra_state, after_step=after_step, data_parallel=data_parallel)
