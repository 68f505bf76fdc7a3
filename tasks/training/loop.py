"""One training loop for SFT and the DPO family: tokenise, batch, compute sequence log-probs, step.

``train_sft`` and ``train_dpo`` differ only in what a batch holds and which registered loss turns its
log-probs into a scalar; the optimisation (AdamW, linear warm-up then linear decay, gradient
clipping, seeded data order) is the single ``_optimise`` function both call.

Tokenisation: prompt (with bos) + completion + eos; the loss covers the completion and eos only.
Batches are padded on the right to their own longest row (dynamic padding). For DPO the reference
log-probs are computed once, up front, without gradients: the reference is frozen, so recomputing
them every step would only cost time.

Determinism: the same config, data, initial weights and thread count give bit-identical weights on
CPU. The data order comes from a ``torch.Generator`` seeded by ``config.seed``; the global random
state is not used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefloop.backends.base import ProgressCallback
from prefloop.backends.hf import completion_logprobs, encode_completion, pad_right
from prefloop.tasks.training.losses import (
    LossHyperparameters,
    LossOutput,
    SequenceLogps,
    completion_logps_and_kl,
    get_loss,
    get_loss_spec,
)


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
    seed: int = Field(0, description="fixes the data order")


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


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + completion + eos and the number of prompt tokens."""

    token_ids: list[int]
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.token_ids) - self.prompt_length


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a batch; ``completion_mask`` is 1 on the tokens that carry loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=-1)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> list[EncodedExample]:
    """Tokenise (prompt, completion) pairs; eos is appended so the model learns to stop."""
    return [
        EncodedExample(*encode_completion(tokenizer, prompt, completion, append_eos=True))
        for prompt, completion in zip(prompts, completions, strict=True)
    ]


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Pad a list of examples to the longest of them (dynamic padding)."""
    return Batch(
        *pad_right([e.token_ids for e in examples], [e.prompt_length for e in examples], pad_id)
    )


def sequence_logprobs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over the completion tokens of each row, shape [batch] (differentiable)."""
    return completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


def _example_order(num_examples: int, batch_size: int, num_steps: int, seed: int) -> Iterator[list[int]]:
    """Example indices per step: successive seeded permutations of the data, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    for _ in range(num_steps):
        while len(stream) < batch_size:
            stream.extend(torch.randperm(num_examples, generator=generator).tolist())
        yield stream[:batch_size]
        stream = stream[batch_size:]


def _num_steps(num_examples: int, config: OptimizationConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / config.batch_size))


def _linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: 0 → 1 over the warm-up, then linearly down to 0 at the last step."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


def _optimise(
    model: PreTrainedModel,
    num_examples: int,
    config: OptimizationConfig,
    loss_for_batch: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
    progress: ProgressCallback | None,
) -> list[dict[str, float]]:
    """The shared loop: for each step, the loss of a batch of example indices, backward, clip, AdamW step."""
    num_steps = _num_steps(num_examples, config)
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(config.warmup_steps, num_steps)
    )
    model.train()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step, indices in enumerate(_example_order(num_examples, config.batch_size, num_steps, config.seed)):
        learning_rate = scheduler.get_last_lr()[0]
        loss, metrics = loss_for_batch(indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        history.append(
            {
                "step": step + 1,
                "loss": loss.item(),
                "learning_rate": learning_rate,
                "grad_norm": float(grad_norm),
                "elapsed_s": time.perf_counter() - started,
                **metrics,
            }
        )
        if progress is not None:
            progress(step + 1, num_steps)
    model.eval()
    return history


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    config: SFTConfig | None = None,
    progress: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (prompt, completion) pairs; returns per-step metrics.

    Loss: the registered ``sft`` loss, −log π(y|x)/|y|, averaged over the batch.
    """
    config = config or SFTConfig()
    if not examples:
        raise ValueError("train_sft got no examples")
    encoded = encode_examples(tokenizer, [p for p, _ in examples], [c for _, c in examples])
    sft = get_loss("sft")
    hyperparameters = LossHyperparameters()

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate([encoded[i] for i in indices], tokenizer.pad_token_id)
        logps = SequenceLogps(policy_chosen=sequence_logprobs(model, batch), chosen_lengths=batch.completion_lengths)
        return sft(logps, hyperparameters).losses.mean(), {"tokens": float(batch.attention_mask.sum())}

    return _optimise(model, len(encoded), config, loss_for_batch, progress)


def _reference_logprobs(
    reference: PreTrainedModel, encoded: list[EncodedExample], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Sequence log-probs of every example under the frozen reference, computed once (no gradients)."""
    reference.eval()
    scores = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            scores.append(sequence_logprobs(reference, collate(encoded[start : start + batch_size], pad_id)))
    return torch.cat(scores)


def _logps_and_kl_to_reference(
    policy: PreTrainedModel, reference: PreTrainedModel, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy sequence log-probs and Σ_t KL(π_ref‖π) over each completion (for TDPO): one forward of each."""
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        reference_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return completion_logps_and_kl(logits, reference_logits, batch.input_ids, batch.completion_mask)


def _preference_metrics(output: LossOutput) -> dict[str, float]:
    """Mean implicit rewards, their margin, and the share of pairs where chosen out-rewards rejected."""
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    if chosen is None or rejected is None:
        return {}
    return {
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
    }


def train_dpo(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str, str]],
    config: DPOConfig | None = None,
    progress: ProgressCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``policy`` in place on (prompt, chosen, rejected) triples against a frozen ``reference``.

    Per step, chosen and rejected rows go through the policy in one forward pass; the loss is the
    registered ``config.loss`` (default ``sigmoid`` = DPO). Metrics per step include the loss, the
    implicit-reward margin β·h and the implicit-reward accuracy (share of pairs with h > 0).
    """
    config = config or DPOConfig()
    loss_spec = get_loss_spec(config.loss)
    if not loss_spec.needs_rejected:
        raise ValueError(f"train_dpo needs a preference loss, got '{config.loss}' (use train_sft for it)")
    if not pairs:
        raise ValueError("train_dpo got no pairs: every prompt was all-correct or all-wrong?")
    prompts = [prompt for prompt, _, _ in pairs]
    chosen = encode_examples(tokenizer, prompts, [c for _, c, _ in pairs])
    rejected = encode_examples(tokenizer, prompts, [r for _, _, r in pairs])
    pad_id = tokenizer.pad_token_id
    reference_chosen = reference_rejected = None
    if loss_spec.needs_reference:
        reference_chosen = _reference_logprobs(reference, chosen, pad_id, 2 * config.batch_size)
        reference_rejected = _reference_logprobs(reference, rejected, pad_id, 2 * config.batch_size)
    hyperparameters = config.loss_hyperparameters()

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate([chosen[i] for i in indices] + [rejected[i] for i in indices], pad_id)
        kl = None  # Σ_t KL(π_ref‖π), only for losses whose spec asks for it (TDPO)
        if loss_spec.needs_kl_to_reference:
            policy_logps, kl = _logps_and_kl_to_reference(policy, reference, batch)
        else:
            policy_logps = sequence_logprobs(policy, batch)
        lengths = batch.completion_lengths
        count = len(indices)
        logps = SequenceLogps(
            policy_chosen=policy_logps[:count],
            policy_rejected=policy_logps[count:],
            reference_chosen=reference_chosen[indices] if reference_chosen is not None else None,
            reference_rejected=reference_rejected[indices] if reference_rejected is not None else None,
            chosen_lengths=lengths[:count],
            rejected_lengths=lengths[count:],
            chosen_kl=kl[:count] if kl is not None else None,
            rejected_kl=kl[count:] if kl is not None else None,
        )
        output = loss_spec(logps, hyperparameters)
        return output.losses.mean(), _preference_metrics(output)

    return _optimise(policy, len(pairs), config, loss_for_batch, progress)
