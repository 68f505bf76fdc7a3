"""The ``reward_model`` labeler of the ``label`` stage: one score per sample from a ``train-rm`` model.

``label: {labeler: reward_model, settings: {aggregation: mean}}`` with ``--input model=REF`` scores
each sample with the single reward model's r(x, y), or with the aggregate of an ensemble's members
(:func:`prefloop.tasks.common.ensembles.aggregate_rewards`), each member first standardised with the
μ_i, σ_i that ``train-rm`` stored from its held-out completions (an older ensemble without them: on
this call's samples, with a note in the metrics). A sample for which a member returns NaN
or inf is dropped as ``nonfinite_reward``. The ``label-rm`` stage is the richer alternative: every
member's score, and pairs as well as samples.

Data-parallel with the label stage's ``sharding`` (:mod:`prefloop.sharding`): the samples are scored in
blocks of ``batch_size`` (one batch each), the blocks run in shards, and the raw member rewards are merged
before any aggregation or standardisation, so the labels do not depend on the shard count.

Registered with :mod:`prefloop.tasks.common.labelers` when imported (the label stage imports it the
first time the labeler is asked for).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prefloop.sharding import blocks, model_loading, run_sharded, sharding_metrics
from prefloop.stage import StageContext
from prefloop.tasks.common.ensembles import (
    PER_CALL_NOTE,
    Aggregation,
    MemberStandardisation,
    aggregate_rewards,
    aggregation_name,
)
from prefloop.tasks.common.labelers import LabelBatch, Labeler, LabelRequest, register_labeler

LABELER_VERSION = "2"  # bump when this labeler's scores change (2: standardised ensemble members)


class RewardModelSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    aggregation: Aggregation = Field("mean", description="how an ensemble's member rewards become one score")
    uncertainty_penalty: float = Field(0.5, ge=0.0, description="λ of uncertainty_weighted: mean − λ·variance")
    batch_size: int = Field(64, ge=1)


def label_with_reward_model(request: LabelRequest) -> LabelBatch:
    """One score per sample: r(x, y) of a single reward model, or the aggregate of an ensemble's members."""
    settings = request.settings or RewardModelSettings()
    samples = request.samples
    model_dir = request.ctx.model_dir("model")
    parts = [samples.slice(run.start, len(run)).select(["prompt", "completion"])
             for run in blocks(samples.num_rows, settings.batch_size)]
    scored, shards = run_sharded(request.ctx, request.config.sharding, parts, score_blocks,
                                 units=[part.num_rows for part in parts], description="samples (reward model)")
    rewards = np.concatenate(scored, axis=1) if scored else np.zeros((1, 0))
    finite = np.isfinite(rewards).all(axis=0)
    kept = np.flatnonzero(finite)
    stored = MemberStandardisation.read(model_dir) if rewards.shape[0] > 1 else None
    scores = rewards[0, kept] if rewards.shape[0] == 1 or not len(kept) else \
        aggregate_rewards(rewards[:, kept], settings.aggregation, settings.uncertainty_penalty, stored)
    batch = LabelBatch()
    sample_ids, prompt_ids = samples.column("sample_id").to_pylist(), samples.column("prompt_id").to_pylist()
    for index, score in zip(kept, scores, strict=True):
        batch.add(sample_ids[index], prompt_ids[index], float(score))
    for index in np.flatnonzero(~finite):
        batch.drop(int(index), "nonfinite_reward", "a reward-model member gave NaN or inf for this sample")
    batch.metrics = {"members": int(rewards.shape[0]), "nonfinite_reward": int((~finite).sum()),
                     **sharding_metrics(request.config.sharding, shards)}
    if rewards.shape[0] > 1:
        batch.metrics["aggregation"] = aggregation_name(settings.aggregation, settings.uncertainty_penalty)
        if stored is None:
            batch.metrics["notes"] = [PER_CALL_NOTE]
    return batch


def score_blocks(ctx: StageContext, parts: list, advance) -> list[np.ndarray]:
    """One shard: the raw rewards [members, rows] of each block of (prompt, completion) rows, from one call of
    the recipe (each member loads once per shard; the shard starts at a block boundary, so the recipe's
    batches are the blocks), holding :func:`~prefloop.sharding.model_loading` since the call loads models."""
    from prefloop.tasks.training.recipes import reward_model as recipe

    settings = RewardModelSettings.model_validate(ctx.config.settings)
    prompts = [prompt for part in parts for prompt in part.column("prompt").to_pylist()]
    completions = [completion for part in parts for completion in part.column("completion").to_pylist()]
    with model_loading():
        rewards = recipe.score_with_members(ctx.model_dir("model"), prompts, completions, settings.batch_size)
    advance(len(prompts))
    bounds = np.cumsum([0] + [part.num_rows for part in parts])
    return [rewards[:, start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


REWARD_MODEL_LABELER = register_labeler(Labeler(
    name="reward_model", version=LABELER_VERSION, label=label_with_reward_model, settings_model=RewardModelSettings,
    needs=frozenset({"model"}),
    description="a train-rm reward model (input 'model'): its reward, or its ensemble's aggregate reward"))
