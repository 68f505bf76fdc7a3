"""Recipe: supervised fine-tuning (the warm start) on (prompt, completion) pairs.

Tokenise once (prompt with bos + completion + eos, cut to ``max_length``), then per step: the
completions' summed log-probs in length groups, the registered ``sft`` loss −log π(y|x)/|y|
averaged over the batch, one optimiser step of the shared loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prefloop.forward import completion_lengths, encode_examples, grouped_sequence_logprobs
from prefloop.tasks.training.configs import SFTConfig
from prefloop.tasks.training.losses import LossHyperparameters, SequenceLogps, get_loss
from prefloop.tasks.training.optim import optimise

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from prefloop.backends.base import ProgressCallback
    from prefloop.tasks.training.distributed import DataParallel
    from prefloop.tasks.training.optim import Checkpointer, MetricValue


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    config: SFTConfig | None = None,
    progress: ProgressCallback | None = None,
    checkpointer: Checkpointer | None = None,
    data_parallel: DataParallel | None = None,
    completion_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (prompt, completion) pairs; returns per-step metrics.

    Loss: the registered ``sft`` loss, −log π(y|x)/|y|, averaged over the batch. ``data_parallel``: this
    process is one rank of a data-parallel run (``tasks/training/distributed.py``). ``completion_ids``:
    per example, the sampled ids of its completion valid for ``tokenizer``
    (:func:`prefloop.forward.sampled_completion_ids`), trained on instead of the re-encoded text; None
    where unknown.
    """
    config = config or SFTConfig()
    if not examples:
        raise ValueError("train_sft got no examples")
    encoded = encode_examples(tokenizer, [p for p, _ in examples], [c for _, c in examples], config.max_length,
                              completion_ids=completion_ids)
    sft = get_loss("sft")
    hyperparameters = LossHyperparameters()
    pad_id = tokenizer.pad_token_id

    def loss_for_batch(indices: list[int]) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        rows = [encoded[i] for i in indices]
        logps = SequenceLogps(policy_chosen=grouped_sequence_logprobs(model, rows, pad_id),
                              chosen_lengths=completion_lengths(rows).to(model.device))
        return sft(logps, hyperparameters).losses.mean(), {"tokens": float(sum(len(r.token_ids) for r in rows))}

    return optimise(model, len(encoded), config, loss_for_batch, progress, checkpointer=checkpointer,
                    data_parallel=data_parallel)
