"""The optimisation component every training recipe calls: data order, LR schedule, checkpoints, the loop.

:func:`optimise` is the single loop of SFT, the DPO family and reward models; a recipe hands it a
``loss_for_batch(indices) -> (scalar loss, metrics)`` and, if it wants, its own data order, extra
modules to checkpoint and an ``after_step`` hook. AdamW, linear warm-up then linear decay, gradient
clipping, gradient accumulation.

Data order: :func:`example_order` is a pure function of the seed (a ``torch.Generator``; the global
random state is not used), so the step number is the whole data-order state.

Schedule: :func:`linear_warmup_decay` is written out rather than taken from
``transformers.get_linear_schedule_with_warmup``: that one starts the warm-up at 0 (step s gets
s/w), this one at 1/w (step s gets (s + 1)/w), so the first optimizer step already moves the
weights; after the warm-up both are identical. Swapping would change every trained model.

Checkpoints: every ``checkpoint_every`` optimizer steps the loop hands a :class:`Checkpoint`
(weights, optimizer, scheduler, step, the metrics so far and any extra modules such as a synced
reference) to a :class:`Checkpointer`; a run that finds one resumes from it and ends with the same
weights as an uninterrupted run.

Data parallel (``data_parallel``, :mod:`prefloop.tasks.training.distributed`): every rank runs this
same loop over the same step order; of each micro-batch m a rank takes its contiguous shard s_r and
back-propagates (|s_r| / |m|) · mean_{i∈s_r} ℓ_i / M, so the all-reduced SUM of the ranks' gradients is
(1/M) Σ_m mean_{i∈m} ∇ℓ_i, the one-process gradient. Clipping, AdamW and the schedule then run on
identical gradients in every rank, so the replicas stay equal; rank 0 alone writes checkpoints.

Determinism: the same config, data, initial weights and thread count give bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prefloop.errors import UserError
from prefloop.lazy import deferred_import

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from prefloop.backends.base import ProgressCallback
    from prefloop.tasks.training.configs import OptimizationConfig
    from prefloop.tasks.training.distributed import DataParallel
else:
    torch = deferred_import("torch")


def example_order(
    num_examples: int, examples_per_step: int, num_steps: int, seed: int, fixed_order: Sequence[int] | None = None
) -> list[list[int]]:
    """Example indices for every optimizer step, fixed before training starts.

    Default: successive seeded permutations of the data, cut into batches (an epoch boundary may fall
    inside a batch). With ``fixed_order`` (all example indices), every epoch walks that same order
    instead (e.g. the train stage's ``order: margin_descending``). A replayed order is not Curry-DPO
    (Pattnaik et al. 2024), which trains staged iterations with the reference reset between stages.
    Because the order is a pure function of its arguments, a resumed run needs only the step number.
    """
    if fixed_order is not None and sorted(fixed_order) != list(range(num_examples)):
        raise UserError(f"a fixed order must list each of the {num_examples} examples exactly once")
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    order: list[list[int]] = []
    for _ in range(num_steps):
        while len(stream) < examples_per_step:
            if fixed_order is not None:
                stream.extend(fixed_order)
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


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
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


# Per-step metrics that count something in a micro-batch (summed over data-parallel shards, not weighted).
COUNT_METRICS = frozenset({"tokens"})


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
    data_parallel: DataParallel | None = None,
) -> list[dict[str, float]]:
    """The one optimisation loop of every trainer (SFT, DPO family, reward models).

    Per optimizer step: the step's example indices (``order``, else :func:`example_order`) are cut into
    ``gradient_accumulation_steps`` micro-batches of ``batch_size``; each micro-batch's loss
    (``loss_for_batch(indices) -> (scalar loss, metrics)``) is divided by their number and
    back-propagated, so the gradient is that of the mean loss over the step; then the gradient norm is
    clipped, AdamW steps and the linear warm-up/decay schedule advances. ``after_step(step)`` runs after
    each step (e.g. a reference soft sync). Every ``checkpoint_every`` steps the state, including
    ``extra_state`` modules, goes to ``checkpointer``; a run whose checkpointer holds one resumes there.
    With ``data_parallel`` this process is one rank of several (module docstring): it trains on its
    shard of every micro-batch and the gradients and metrics are summed over the ranks.

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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(config.warmup_steps, num_steps))
    extra_state = extra_state or {}
    history: list[dict[str, MetricValue]] = []
    first_step = 0
    checkpoint = checkpointer.load() if checkpointer is not None else None
    if checkpoint is not None:
        if checkpoint.num_steps != num_steps or set(checkpoint.extra) != set(extra_state):
            raise UserError(
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
    if data_parallel is not None:
        # Every rank starts from rank 0's state, as DDP does (a no-op when they already agree).
        data_parallel.broadcast_modules([model, *extra_state.values()])
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
            shard = micro_batch if data_parallel is None else data_parallel.shard(micro_batch)
            if not shard:
                continue
            share = len(shard) / len(micro_batch)  # 1 in one process
            with autocast():
                loss, metrics = loss_for_batch(shard)
            (loss * share / len(micro_batches)).backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                # A count (tokens) adds up over the shards; a mean is weighted by the shard's share.
                weight = 1.0 if key in COUNT_METRICS else share
                totals[key] = totals.get(key, 0.0) + value * weight / len(micro_batches)
        if data_parallel is not None:
            data_parallel.sum_gradients(parameters)
            totals = data_parallel.sum_metrics(totals)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step + 1)
        history.append({"step": step + 1, "loss": totals.pop("loss"), "learning_rate": learning_rate,
                        "grad_norm": grad_norm, "elapsed_s": time.perf_counter() - started, **totals})
        every = config.checkpoint_every
        # The replicas of a data-parallel run are equal, so rank 0 alone writes the checkpoint.
        writes = data_parallel is None or data_parallel.rank == 0
        if checkpointer is not None and every is not None and (step + 1) % every == 0 and step + 1 < num_steps \
                and writes:
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
