"""The ``reward_model`` labeler of the ``label`` stage: one score per sample from a ``train-rm`` model.

``label: {labeler: reward_model, settings: {aggregation: mean}}`` with ``--input model=REF`` scores
each sample with the single reward model's r(x, y), or with the aggregate of an ensemble's members
(:func:`prefloop.tasks.common.ensembles.aggregate_rewards`), each member first standardised with the
μ_i, σ_i that ``train-rm`` stored from its held-out completions (an older ensemble without them: on
this call's samples, with a note in the metrics). A sample for which a member returns NaN
or inf is dropped as ``nonfinite_reward``. The ``label-rm`` stage is the richer alternative: every
member's score, and pairs as well as samples.

Registered with :mod:`prefloop.tasks.common.labelers` when imported (the label stage imports it the
first time the labeler is asked for).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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
    from prefloop.tasks.training.recipes.reward_model import score_with_members

    settings = request.settings or RewardModelSettings()
    samples = request.samples
    model_dir = request.ctx.model_dir("model")
    rewards = score_with_members(model_dir, samples.column("prompt").to_pylist(),
                                 samples.column("completion").to_pylist(), settings.batch_size)
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
    batch.metrics = {"members": int(rewards.shape[0]), "nonfinite_reward": int((~finite).sum())}
    if rewards.shape[0] > 1:
        batch.metrics["aggregation"] = aggregation_name(settings.aggregation, settings.uncertainty_penalty)
        if stored is None:
            batch.metrics["notes"] = [PER_CALL_NOTE]
    return batch


REWARD_MODEL_LABELER = register_labeler(Labeler(
    name="reward_model", version=LABELER_VERSION, label=label_with_reward_model, settings_model=RewardModelSettings,
    needs=frozenset({"model"}),
    description="a train-rm reward model (input 'model'): its reward, or its ensemble's aggregate reward"))
