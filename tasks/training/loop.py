"""One training loop for SFT, the DPO family and reward models: tokenise, batch, compute log-probs, step.

``train_sft`` and ``train_dpo`` differ only in what a batch holds and which registered loss turns its
log-probs into a scalar; the optimisation (AdamW, linear warm-up then linear decay, gradient
clipping, gradient accumulation, seeded data order, checkpoints) is the single public
:func:`optimise` that every trainer calls with its own ``loss_for_batch``.

Tokenisation: prompt (with bos) + completion + eos, cut to ``max_length`` from the end (keep the
start, as TRL does); the loss covers the completion and eos only. Each forward pass sorts the rows
of a batch by length and runs them in groups padded only to the group's longest row (dynamic
padding without most of its waste); right padding needs no attention mask, since a causal model's
real tokens never attend to the pads after them. Chosen and rejected rows of a DPO batch share
these forward passes.

Reference log-probs: the reference is frozen, so its sequence log-probs are computed once per
round (:func:`reference_logprobs`, stored by the ``reference`` stage as an artifact keyed by
pair_id) instead of a reference forward pass every step. Only a reference that changes during
training (TR-DPO's soft sync) or a loss that needs the reference's whole token distribution (TDPO)
runs the reference model per step.

Checkpoints: every ``checkpoint_every`` optimizer steps the loop hands a :class:`Checkpoint`
(weights, optimizer, scheduler, step, the metrics so far and any extra modules such as a synced
reference) to a :class:`Checkpointer`; a run that finds one resumes from it and ends with the same
weights as an uninterrupted run. The data order is a pure function of the seed, so the step number
is the whole data-order state.

Determinism: the same config, data, initial weights and thread count give bit-identical weights on
CPU. The data order comes from a ``torch.Generator`` seeded by ``config.seed``; the global random
state is not used.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefloop.backends.base import ProgressCallback
from prefloop.backends.hf import completion_logprobs, encode_completion, pad_right, selected_logprob_sums
from prefloop.lazy import deferred_import
from prefloop.tasks.training.losses import (
    LossHyperparameters,
    LossOutput,
    SequenceLogps,
    completion_logps_and_kl,
    get_loss,
    get_loss_spec,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = deferred_import("torch")


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

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


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
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int | None = None,
) -> list[EncodedExample]:
    """Tokenise (prompt, completion) pairs; eos is appended so the model learns to stop.

    With ``max_length`` a longer sequence keeps its first ``max_length`` tokens (the cut completion
    then has no eos); a prompt that leaves no completion token at all is an error.
    """
    encoded = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        token_ids, prompt_length = encode_completion(tokenizer, prompt, completion, append_eos=True)
        if max_length is not None and len(token_ids) > max_length:
            if prompt_length >= max_length:
                raise ValueError(
                    f"example {index}: its prompt alone has {prompt_length} tokens but max_length is {max_length}, "
                    "so no completion token would be trained: raise max_length or drop such prompts"
                )
            token_ids = token_ids[:max_length]
        encoded.append(EncodedExample(token_ids, prompt_length))
    return encoded


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Pad a list of examples to the longest of them (dynamic padding)."""
    return Batch(
        *pad_right([e.token_ids for e in examples], [e.prompt_length for e in examples], pad_id)
    )


def sequence_logprobs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over the completion tokens of each row, shape [batch] (differentiable)."""
    return completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


# Padded tokens per forward pass when a batch is split into length groups. Smaller groups waste less
# on padding but pay Python and kernel-launch overhead per pass; on the embedded model, 1024 tokens
# for single rows and 512 for prefix-sharing pair rows (32 pairs: 4-6 passes) measured fastest
# (fwd + bwd of one batch, 256 to 1024 within noise of each other; benchmarks/trainer_vs_trl.py
# times whole runs). Packing several short pair rows into one row (first-fit decreasing) saved no
# padding over these groups on the benchmark's data and was slower: one wide row makes attention
# quadratic in its width.
GROUP_TOKENS = 1024
PAIR_GROUP_TOKENS = 512
INFERENCE_GROUP_TOKENS = 8192


def length_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in groups for forward passes: longest first, each group padded to its first row's
    length and holding at most ``max_tokens`` padded tokens (at least one row). Ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    groups: list[list[int]] = []
    width = 0
    for index in order:
        if not groups or (len(groups[-1]) + 1) * width > max_tokens:
            groups.append([])
            width = lengths[index]
        groups[-1].append(index)
    return groups


def _causal_completion_logprobs(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Σ log π over the completion tokens of right-padded rows, without an attention mask.

    Under a causal mask a real token only attends to earlier positions, which are all real when the
    padding is on the right; the pads' own outputs carry no loss. Leaving the mask out lets the
    attention kernel take its fast causal path instead of materialising a padding mask.
    """
    input_ids, completion_mask = batch.input_ids.to(model.device), batch.completion_mask.to(model.device)
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * completion_mask[:, 1:]).sum(dim=-1)


def grouped_sequence_logprobs(
    model: PreTrainedModel, examples: Sequence[EncodedExample], pad_id: int, max_tokens: int = GROUP_TOKENS
) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over each example's completion tokens, shape [len(examples)], in the
    examples' order; rows run in length groups (:func:`length_groups`) so little compute goes to pads.
    Differentiable; call under ``torch.inference_mode()`` for scoring."""
    groups = length_groups([len(example.token_ids) for example in examples], max_tokens)
    parts = [_causal_completion_logprobs(model, collate([examples[i] for i in group], pad_id)) for group in groups]
    flat = torch.cat(parts)
    position = torch.empty(len(examples), dtype=torch.long)
    position[torch.tensor([index for group in groups for index in group])] = torch.arange(len(examples))
    return flat[position.to(flat.device)]


@dataclass(frozen=True)
class _PairRow:
    """One preference pair laid out as one row: the prefix both sequences share, then the rest of the
    chosen sequence, then the rest of the rejected one. Only inputs are laid out: a sequence's last
    token is a target but never an input (no later token of its own reads it)."""

    token_ids: list[int]
    position_ids: list[int]
    branch: list[int]  # 0 shared prefix, 1 chosen only, 2 rejected only
    # For each completion token (the target), the row offset whose logits predict it.
    chosen_sources: list[int]
    chosen_targets: list[int]
    rejected_sources: list[int]
    rejected_targets: list[int]


def _pair_row(chosen: EncodedExample, rejected: EncodedExample, index: int) -> _PairRow:
    prompt = chosen.prompt_length
    chosen_ids, rejected_ids = chosen.token_ids, rejected.token_ids
    if rejected.prompt_length != prompt or rejected_ids[:prompt] != chosen_ids[:prompt]:
        raise ValueError(f"pair {index}: chosen and rejected do not share their prompt tokens")
    chosen_inputs, rejected_inputs = len(chosen_ids) - 1, len(rejected_ids) - 1
    shared = min(prompt, chosen_inputs, rejected_inputs)
    limit = min(chosen_inputs, rejected_inputs)
    while shared < limit and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    first_target = max(prompt, 1)  # position 0 has no logits before it
    return _PairRow(
        token_ids=chosen_ids[:chosen_inputs] + rejected_ids[shared:rejected_inputs],
        position_ids=[*range(chosen_inputs), *range(shared, rejected_inputs)],
        branch=[0] * shared + [1] * (chosen_inputs - shared) + [2] * (rejected_inputs - shared),
        chosen_sources=list(range(first_target - 1, chosen_inputs)),
        chosen_targets=chosen_ids[first_target:],
        rejected_sources=[position if position < shared else chosen_inputs + position - shared
                          for position in range(first_target - 1, rejected_inputs)],
        rejected_targets=rejected_ids[first_target:],
    )


def pair_sequence_logprobs(
    model: PreTrainedModel,
    chosen: Sequence[EncodedExample],
    rejected: Sequence[EncodedExample],
    pad_id: int,
    max_tokens: int = PAIR_GROUP_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over the chosen and over the rejected completion of each pair, their shared prefix run once.

    Each pair is one row: the prefix the two sequences share (the prompt and any common start of the
    two completions), then the rest of the chosen sequence, then the rest of the rejected one. The
    rejected tokens take the positions that follow the shared prefix (position ids S, S+1, … like the
    chosen ones) and a 4-D attention mask keeps them from attending to the chosen tokens, so each
    sequence sees exactly its own earlier tokens, as in two separate rows, while the shared tokens are
    computed once (prefix sharing, as in Wang et al. 2024, "Accelerating Direct Preference
    Optimization with Prefix Sharing"). A completion token in the shared prefix has the same
    log-prob in both sequences and counts in both sums. The last token of each sequence is only a
    target and is not fed in. Rows run in length groups (:func:`length_groups`). Differentiable, and
    the same sums as two separate padded rows per pair up to float rounding.
    """
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        # Kernels without arbitrary masks (flash attention): one row per completion instead.
        scores = grouped_sequence_logprobs(model, [*chosen, *rejected], pad_id, 2 * max_tokens)
        return scores[: len(chosen)], scores[len(chosen) :]
    pair_rows = [_pair_row(first, second, index)
                 for index, (first, second) in enumerate(zip(chosen, rejected, strict=True))]
    lengths = [len(row.token_ids) for row in pair_rows]
    groups = length_groups(lengths, max_tokens)
    device = model.device
    parts = []
    for group in groups:
        width = lengths[group[0]]
        # Flat lists, one tensor each: building rows with per-row tensor writes costs more than the pass.
        token_ids, position_ids, branch = [pad_id] * (len(group) * width), [0] * (len(group) * width), \
            [3] * (len(group) * width)  # branch 3: pad
        sources, targets = [], []
        for row, index in enumerate(group):
            pair_row, start = pair_rows[index], row * width
            end = start + lengths[index]
            token_ids[start:end], position_ids[start:end], branch[start:end] = \
                pair_row.token_ids, pair_row.position_ids, pair_row.branch
            sources.append([start + offset for offset in pair_row.chosen_sources])
            targets.append(pair_row.chosen_targets)
        for row, index in enumerate(group):
            pair_row, start = pair_rows[index], row * width
            sources.append([start + offset for offset in pair_row.rejected_sources])
            targets.append(pair_row.rejected_targets)
        shape = (len(group), width)
        input_ids = torch.tensor(token_ids, dtype=torch.long).view(shape).to(device)
        position_ids = torch.tensor(position_ids, dtype=torch.long).view(shape).to(device)
        branches = torch.tensor(branch, dtype=torch.long).view(shape).to(device)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # Pads come last, so causality already hides them from real tokens; pad rows still see earlier
        # tokens, which keeps every softmax row finite.
        attention_mask = (causal & ~((branches[:, :, None] == 2) & (branches[:, None, :] == 1)))[:, None]
        if implementation == "eager":  # eager attention adds the mask to the scores
            blocked = torch.finfo(model.dtype).min
            attention_mask = torch.zeros(attention_mask.shape, dtype=model.dtype, device=device).masked_fill(
                ~attention_mask, blocked)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        sums = selected_logprob_sums(logits.reshape(-1, logits.shape[-1]), sources, targets)
        parts.append(sums.view(2, len(group)))
    position = torch.empty(len(lengths), dtype=torch.long)
    position[torch.tensor([index for group in groups for index in group])] = torch.arange(len(lengths))
    position = position.to(device)
    chosen_sums, rejected_sums = torch.cat(parts, dim=1)
    return chosen_sums[position], rejected_sums[position]


def completion_lengths(examples: Sequence[EncodedExample]) -> torch.Tensor:
    """Completion tokens (eos included) of each example, as float32 (the losses divide by them)."""
    return torch.tensor([example.completion_length for example in examples], dtype=torch.float32)


def example_order(
    num_examples: int, examples_per_step: int, num_steps: int, seed: int, curriculum: Sequence[int] | None = None
) -> list[list[int]]:
    """Example indices for every optimizer step, fixed before training starts.

    Default: successive seeded permutations of the data, cut into batches (an epoch boundary may fall
    inside a batch). With ``curriculum`` (all example indices, easiest first), every epoch walks that
    order instead (Curry-DPO, Pattnaik et al. 2024: easy pairs, i.e. large margins, first). Because the
    order is a pure function of its arguments, a resumed run needs only the step number.
    """
    if curriculum is not None and sorted(curriculum) != list(range(num_examples)):
        raise ValueError(f"a curriculum must list each of the {num_examples} examples exactly once")
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    order: list[list[int]] = []
    for _ in range(num_steps):
        while len(stream) < examples_per_step:
            if curriculum is not None:
                stream.extend(curriculum)
            else:
                stream.extend(torch.randperm(num_examples, generator=generator).tolist())
        order.append(stream[:examples_per_step])
        stream = stream[examples_per_step:]
    return order


def num_steps_for(num_examples: int, config: OptimizationConfig) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs`` passes over the data (rounded up)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / config.examples_per_step))


_num_steps = num_steps_for


def _linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: 0 → 1 over the warm-up, then linearly down to 0 at the last step."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


@dataclass
class Checkpoint:
    """Everything a run needs to continue after ``step`` optimizer steps as if it had never stopped."""

    step: int
    num_steps: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, float]]
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "num_steps": self.num_steps, "model": self.model, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "history": self.history, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(**data)


class Checkpointer(Protocol):
    """Where a run keeps its checkpoints (the train stages: the artifact store, keyed by output id)."""

    def load(self) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint) -> None: ...


if TYPE_CHECKING:
    MetricValue = float | torch.Tensor
    LossForBatch = Callable[[list[int]], tuple[torch.Tensor, dict[str, MetricValue]]]


def _as_floats(history: list[dict[str, MetricValue]]) -> list[dict[str, float]]:
    """Per-step metrics as plain numbers. The loop keeps them as tensors until a checkpoint or the end,
    so no step waits on a host sync just to log."""
    return [{key: float(value) if isinstance(value, torch.Tensor) else value for key, value in step.items()}
            for step in history]


def optimise(
    model: PreTrainedModel,
    num_examples: int,
    config: OptimizationConfig,
    loss_for_batch: LossForBatch,
    progress: ProgressCallback | None = None,
    *,
    checkpointer: Checkpointer | None = None,
    order: list[list[int]] | None = None,
    extra_state: dict[str, torch.nn.Module] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """The one optimisation loop of every trainer (SFT, DPO family, reward models).

    Per optimizer step: the step's example indices (``order``, else :func:`example_order`) are cut into
    ``gradient_accumulation_steps`` micro-batches of ``batch_size``; each micro-batch's loss
    (``loss_for_batch(indices) -> (scalar loss, metrics)``) is divided by their number and
    back-propagated, so the gradient is that of the mean loss over the step; then the gradient norm is
    clipped, AdamW steps and the linear warm-up/decay schedule advances. ``after_step(step)`` runs after
    each step (e.g. a reference soft sync). Every ``checkpoint_every`` steps the state, including
    ``extra_state`` modules, goes to ``checkpointer``; a run whose checkpointer holds one resumes there.

    Returns one metrics dict per step: step, loss, learning_rate, grad_norm, elapsed_s and the
    micro-batch-averaged metrics of ``loss_for_batch``.
    """
    num_steps = len(order) if order is not None else num_steps_for(num_examples, config)
    if order is None:
        order = example_order(num_examples, config.examples_per_step, num_steps, config.seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup_decay(config.warmup_steps, num_steps))
    extra_state = extra_state or {}
    history: list[dict[str, MetricValue]] = []
    first_step = 0
    checkpoint = checkpointer.load() if checkpointer is not None else None
    if checkpoint is not None:
        if checkpoint.num_steps != num_steps or set(checkpoint.extra) != set(extra_state):
            raise ValueError(
                f"the checkpoint at step {checkpoint.step} belongs to a run of {checkpoint.num_steps} steps with "
                f"extra state {sorted(checkpoint.extra)}, not to this run ({num_steps} steps, {sorted(extra_state)}): "
                "it was written by different code; delete it to start over"
            )
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        for name, module in extra_state.items():
            module.load_state_dict(checkpoint.extra[name])
        history = list(checkpoint.history)
        first_step = checkpoint.step
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    model.train()
    # On a GPU the forward passes run in bf16 autocast (weights and optimizer stay float32); on CPU in float32.
    def autocast() -> contextlib.AbstractContextManager:
        if model.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    started = time.perf_counter()
    for step in range(first_step, num_steps):
        learning_rate = scheduler.get_last_lr()[0]
        indices = order[step]
        micro_batches = [indices[start : start + config.batch_size] for start in range(0, len(indices), config.batch_size)]
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, MetricValue] = {}
        for micro_batch in micro_batches:
            with autocast():
                loss, metrics = loss_for_batch(micro_batch)
            (loss / len(micro_batches)).backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step + 1)
        history.append({"step": step + 1, "loss": totals.pop("loss"), "learning_rate": learning_rate,
                        "grad_norm": grad_norm, "elapsed_s": time.perf_counter() - started, **totals})
        every = config.checkpoint_every
        if checkpointer is not None and every is not None and (step + 1) % every == 0 and step + 1 < num_steps:
            history = _as_floats(history)
            checkpointer.save(Checkpoint(
                step=step + 1, num_steps=num_steps, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), history=history,
                extra={name: module.state_dict() for name, module in extra_state.items()},
            ))
        if progress is not None:
            progress(step + 1, num_steps)
    model.eval()
    return _as_floats(history)


_optimise = optimise  # the name the first trainers used


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    config: SFTConfig | None = None,
    progress: ProgressCallback | None = None,
    checkpointer: Checkpointer | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (prompt, completion) pairs; returns per-step metrics.

    Loss: the registered ``sft`` loss, −log π(y|x)/|y|, averaged over the batch.
    """
    config = config or SFTConfig()
    if not examples:
        raise ValueError("train_sft got no examples")
    encoded = encode_examples(tokenizer, [p for p, _ in examples], [c for _, c in examples], config.max_length)
    sft = get_loss("sft")
    hyperparameters = LossHyperparameters()
    pad_id = tokenizer.pad_token_id

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        rows = [encoded[i] for i in indices]
        logps = SequenceLogps(policy_chosen=grouped_sequence_logprobs(model, rows, pad_id),
                              chosen_lengths=completion_lengths(rows).to(model.device))
        return sft(logps, hyperparameters).losses.mean(), {"tokens": float(sum(len(r.token_ids) for r in rows))}

    return optimise(model, len(encoded), config, loss_for_batch, progress, checkpointer=checkpointer)


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
) -> PreparedPairs:
    """Tokenise preference triples once, for the reference pass and for training; ``label_flip_rates``
    (one ε per pair) travel with them to the loss."""
    prompts = [prompt for prompt, _, _ in pairs]
    if label_flip_rates is not None and len(label_flip_rates) != len(pairs):
        raise ValueError(f"got {len(label_flip_rates)} label flip rates for {len(pairs)} pairs: give one per pair")
    return PreparedPairs(
        chosen=encode_examples(tokenizer, prompts, [chosen for _, chosen, _ in pairs], max_length),
        rejected=encode_examples(tokenizer, prompts, [rejected for _, _, rejected in pairs], max_length),
        label_flip_rates=(torch.tensor(label_flip_rates, dtype=torch.float32)
                          if label_flip_rates is not None else None),
    )


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
        raise ValueError(f"a geometric mixture weight must lie in [0, 1], got {first_weight}")
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
            raise ValueError(f"soft sync needs 0 < alpha <= 1 and every >= 1, got alpha={self.alpha}, every={self.every}")

    def apply(self, policy: PreTrainedModel, reference: PreTrainedModel) -> None:
        with torch.no_grad():
            for reference_parameter, parameter in zip(reference.parameters(), policy.parameters(), strict=True):
                reference_parameter.lerp_(parameter, self.alpha)


def _logps_and_kl_to_reference(
    policy: PreTrainedModel, reference: PreTrainedModel, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy sequence log-probs and Σ_t KL(π_ref‖π) over each completion (for TDPO): one forward of each."""
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        reference_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return completion_logps_and_kl(logits, reference_logits, batch.input_ids, batch.completion_mask)


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
    curriculum: Sequence[int] | None = None,
    soft_sync: SoftSync | None = None,
    checkpointer: Checkpointer | None = None,
) -> list[dict[str, float]]:
    """Train ``policy`` in place on (prompt, chosen, rejected) triples against a reference.

    Per step, the chosen and rejected rows of the batch go through the policy together (in length
    groups); the loss is the registered ``config.loss`` (default ``sigmoid`` = DPO). Metrics per step
    include the loss, the implicit-reward margin β·h, the implicit-reward accuracy (share of pairs with
    h > 0) and a KL estimate.

    The reference enters as ``reference_logps`` (computed once per round, e.g. by the ``reference``
    stage) or, when they are not given, as log-probs computed here once from ``reference``. With
    ``soft_sync`` (TR-DPO) the reference model changes every k steps, so its log-probs are computed per
    step. ``curriculum`` fixes the order of the pairs in each epoch (:func:`example_order`);
    ``prepared`` skips tokenising again; ``checkpointer`` makes the run resumable.
    """
    config = config or DPOConfig()
    loss_spec = get_loss_spec(config.loss)
    if not loss_spec.needs_rejected:
        raise ValueError(f"train_dpo needs a preference loss, got '{config.loss}' (use train_sft for it)")
    if not pairs:
        raise ValueError("train_dpo got no pairs: every prompt was all-correct or all-wrong?")
    prepared = prepared or prepare_pairs(tokenizer, pairs, config.max_length)
    if len(prepared) != len(pairs):
        raise ValueError(f"prepared pairs hold {len(prepared)} pairs but {len(pairs)} were given")
    pad_id = tokenizer.pad_token_id
    per_step_reference = soft_sync is not None or loss_spec.needs_kl_to_reference
    if (per_step_reference or (loss_spec.needs_reference and reference_logps is None)) and reference is None:
        raise ValueError(
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
            raise ValueError(f"per-pair label flip rates were given but loss '{config.loss}' does not read ε: "
                             "use cdpo or rdpo, or leave the rates out")
        flip_rates = flip_rates.to(policy.device)

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        count = len(indices)
        rows = [chosen[i] for i in indices] + [rejected[i] for i in indices]
        kl = None  # Σ_t KL(π_ref‖π), only for losses whose spec asks for it (TDPO)
        if loss_spec.needs_kl_to_reference:
            batch = collate(rows, pad_id)
            policy_logps, kl = _logps_and_kl_to_reference(policy, reference, batch)
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
    order = example_order(len(pairs), config.examples_per_step, num_steps, config.seed, curriculum)
    extra_state: dict[str, torch.nn.Module] = {}
    after_step = None
    if soft_sync is not None:
        extra_state["reference"] = reference

        def after_step(step: int) -> None:
            if step % soft_sync.every == 0:
                soft_sync.apply(policy, reference)

    return optimise(policy, len(pairs), config, loss_for_batch, progress, checkpointer=checkpointer, order=order,
                    extra_state=extra_state, after_step=after_step)
