"""Stage ``label-rm``: label samples or pairs with a reward model, or with every member of an
ensemble plus their aggregate.

Targets:

* ``samples`` → one row per sample and labeler, score = r(x, y) (``target_kind = "sample"``,
  ``target_id`` = sample id): what ``construct`` ranks and what ensemble filters read per member;
* ``preferences`` → one row per pair and labeler, score = the margin r(x, y_w) − r(x, y_l)
  (``target_kind = "pair"``, ``target_id`` = pair id): the preference strength of "Secrets of RLHF II"
  when read across members.

Labelers (each row carries its labeler id and version):

* one reward model: ``rm:<model-id>``;
* an ensemble of k: ``rm:<model-id>/member-<i>`` for each member — by default nothing else, which is
  what the ``filter`` stage's ``ensemble_labels`` input expects (every labeler in it is a member);
  with ``aggregation`` set, also the aggregate ``rm-ensemble:<model-id>/<aggregation>`` (``mean``,
  ``min``, or ``mean-<λ>var`` for the uncertainty-weighted mean − λ·variance; see
  :func:`prefloop.tasks.common.ensembles.aggregate_rewards`). The aggregate is taken over the members'
  *standardised* rewards z_i = (r_i − μ_i)/σ_i, with μ_i, σ_i those ``train-rm`` stored from its
  held-out completions (on pairs: the standardised margins (r_i(y_w) − r_i(y_l))/σ_i), so it does not
  depend on a member's arbitrary Bradley–Terry offset or scale. Member rows keep the raw reward r_i;
  μ_i, σ_i of each member labeler are in the metric ``member_standardisation``.

A row for which any member returns NaN or inf is labelled by nobody: it goes to ``drops`` with the
reason ``nonfinite_reward`` (an aggregate over a non-finite member would be meaningless).

This is its own stage rather than a labeler inside ``label``: it writes several labelers (one per
member, plus the aggregate) into one artifact and can label pairs as well as samples, where a ``label``
labeler writes one score per sample under one name. For that simpler case the ``label`` stage has the
labeler ``reward_model`` (:mod:`prefloop.tasks.reward_model_labeler`).

Data-parallel (``sharding``, :mod:`prefloop.sharding`): rows are scored in blocks of ``batch_size`` (a pair
block's chosen and rejected completions in one call, so each member loads once per shard), blocks run in
shards, and the raw member rewards are merged before standardisation and aggregation, so the labels do
not depend on the shard count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import LABELS, PREFERENCES, SAMPLES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import ShardedStageConfig, blocks, model_loading, run_sharded, sharding_metrics
from prefloop.stage import StageContext, StageOutput
from prefloop.tasks.common.ensembles import (
    PER_CALL_NOTE,
    Aggregation,
    MemberStandardisation,
    aggregate_margins,
    aggregate_rewards,
    aggregation_name,
    standardisation_for,
)
from prefloop.tasks.registry import stage_spec

LABELER_VERSION = "2"  # 2: the ensemble aggregate standardises each member first


class RewardLabelConfig(ShardedStageConfig):
    aggregation: Aggregation | None = Field(
        None, description="also write this ensemble aggregate next to the members (null: members only, the form "
                          "the filter stage's ensemble_labels input expects)")
    uncertainty_penalty: float = Field(0.5, ge=0.0, description="λ of uncertainty_weighted: mean − λ·variance")
    batch_size: int = Field(64, ge=1)


SPEC = stage_spec(
    "label-rm",
    version="1",
    config_model=RewardLabelConfig,
    output_table=LABELS,
    description="Score samples (reward) or pairs (margin r_w − r_l) with a reward model, or with each member of "
                "an ensemble plus their aggregate.",
)


def member_labelers(model_id: str, members: int) -> list[str]:
    """Labeler ids: ``rm:<model-id>`` for one model, ``rm:<model-id>/member-<i>`` for ensemble members."""
    return [f"rm:{model_id}"] if members == 1 else [f"rm:{model_id}/member-{i}" for i in range(members)]


def aggregate_labeler(model_id: str, aggregation: Aggregation, uncertainty_penalty: float) -> str:
    """Labeler id of an ensemble aggregate, e.g. ``rm-ensemble:<model-id>/mean``."""
    return f"rm-ensemble:{model_id}/{aggregation_name(aggregation, uncertainty_penalty)}"


def label_rows(target_ids: list[str], prompt_ids: list[str | None], kind: str, labeler: str,
               scores: np.ndarray) -> dict[str, list]:
    """LABELS columns for one labeler's scores of the given targets."""
    count = len(target_ids)
    return {
        "label_id": [content_id(labeler, LABELER_VERSION, kind, target) for target in target_ids],
        "target_id": list(target_ids),
        "target_kind": [kind] * count,
        "prompt_id": list(prompt_ids),
        "labeler": [labeler] * count,
        "labeler_version": [LABELER_VERSION] * count,
        "score": [float(s) for s in scores],
        "verdict": [None] * count,
        "extracted_answer": [None] * count,
    }


def score_blocks(ctx: StageContext, parts: list[tuple[list[str], list[str]]], advance) -> list[np.ndarray]:
    """One shard: raw rewards [members, rows] of each block of (prompts, completions).

    The shard's blocks go to the recipe in one call (each member loads once per shard); a shard starts at a
    block boundary, so the recipe's batches of ``batch_size`` are the blocks. The call loads the models, so
    it holds :func:`~prefloop.sharding.model_loading` (shards in threads score one at a time; processes and
    Ray workers in parallel)."""
    from prefloop.tasks.training.recipes import reward_model as recipe

    prompts = [prompt for part_prompts, _ in parts for prompt in part_prompts]
    completions = [completion for _, part_completions in parts for completion in part_completions]
    with model_loading():
        rewards = recipe.score_with_members(ctx.model_dir("reward_model"), prompts, completions, ctx.config.batch_size)
    advance(len(prompts))
    bounds = np.cumsum([0] + [len(part_prompts) for part_prompts, _ in parts])
    return [rewards[:, start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def _score(ctx: StageContext, prompts: list[str], completions: list[str], pairs: bool) -> tuple[np.ndarray, int]:
    """Rewards [members, rows] in blocks of batch_size rows, sharded; for pairs, ``completions`` is chosen +
    rejected and a block scores its rows' chosen and rejected together (returned in the same layout)."""
    config: RewardLabelConfig = ctx.config
    count = len(prompts) // 2 if pairs else len(prompts)
    runs = blocks(count, config.batch_size)
    if pairs:
        parts = [(prompts[r.start:r.stop] * 2, completions[r.start:r.stop] + completions[count + r.start:count + r.stop])
                 for r in runs]
    else:
        parts = [(prompts[r.start:r.stop], completions[r.start:r.stop]) for r in runs]
    scored, shards = run_sharded(ctx, config.sharding, parts, score_blocks, units=[len(p) for p, _ in parts],
                                 description="rows (reward model)")
    if not pairs:
        return np.concatenate(scored, axis=1), shards
    chosen = np.concatenate([block[:, : block.shape[1] // 2] for block in scored], axis=1)
    rejected = np.concatenate([block[:, block.shape[1] // 2:] for block in scored], axis=1)
    return np.concatenate([chosen, rejected], axis=1), shards


def compute(ctx: StageContext) -> StageOutput:
    config: RewardLabelConfig = ctx.config
    if ctx.has("samples") == ctx.has("preferences"):
        raise UserError("label-rm scores either samples (--input samples=REF) or pairs (--input preferences=REF): "
                         "give exactly one of them")
    model_dir = ctx.model_dir("reward_model")
    model_id = ctx.inputs["reward_model"].id
    role = "samples" if ctx.has("samples") else "preferences"
    table = ctx.read(role, SAMPLES if role == "samples" else PREFERENCES)
    if table.num_rows == 0:
        raise UserError(f"{role} {ctx.inputs[role]} is empty: there is nothing to score")
    prompts = table.column("prompt").to_pylist()
    if role == "samples":
        kind, target_ids = "sample", table.column("sample_id").to_pylist()
        rewards, shards = _score(ctx, prompts, table.column("completion").to_pylist(), pairs=False)
        chosen = rejected = None
    else:
        kind, target_ids = "pair", table.column("pair_id").to_pylist()
        both, shards = _score(ctx, prompts + prompts, table.column("chosen").to_pylist()
                              + table.column("rejected").to_pylist(), pairs=True)
        chosen, rejected = both[:, : len(prompts)], both[:, len(prompts):]
        rewards = chosen - rejected
    finite = np.isfinite(rewards).all(axis=0)
    bad = np.flatnonzero(~finite)
    drops = make_drops(table, bad, ["nonfinite_reward"] * len(bad), role,
                       detail="a reward-model member gave NaN or inf for this row, so no labeler labels it")
    kept = np.flatnonzero(finite)
    kept_ids = [target_ids[i] for i in kept]
    prompt_ids = table.column("prompt_id").to_pylist()
    kept_prompts = [prompt_ids[i] for i in kept]
    members = rewards.shape[0]
    labelers = member_labelers(model_id, members)
    parts = [label_rows(kept_ids, kept_prompts, kind, labeler, rewards[index, kept])
             for index, labeler in enumerate(labelers)]
    metrics: dict[str, object] = {"targets": table.num_rows, "target_kind": kind, "labeled": int(len(kept)),
                                  "nonfinite_reward": int(len(bad)), "members": members,
                                  **sharding_metrics(config.sharding, shards)}
    if members > 1 and len(kept):
        stored = MemberStandardisation.read(model_dir)
        scale = stored
        if config.aggregation is not None:
            if chosen is None or rejected is None:
                scale = standardisation_for(rewards[:, kept], stored)
                combined = aggregate_rewards(rewards[:, kept], config.aggregation, config.uncertainty_penalty, scale)
            else:
                scale = standardisation_for(np.concatenate([chosen[:, kept], rejected[:, kept]], axis=1), stored)
                combined = aggregate_margins(chosen[:, kept], rejected[:, kept], config.aggregation,
                                             config.uncertainty_penalty, scale)
            labelers.append(aggregate_labeler(model_id, config.aggregation, config.uncertainty_penalty))
            parts.append(label_rows(kept_ids, kept_prompts, kind, labelers[-1], combined))
            if stored is None:
                metrics["notes"] = [PER_CALL_NOTE]
        if scale is not None:
            # The filter can read these to compare members' margins on one scale.
            metrics["member_standardisation"] = {
                labeler: {"mean": mean, "std": std}
                for labeler, mean, std in zip(labelers[:members], scale.means, scale.stds, strict=True)}
            metrics["standardisation_reference"] = scale.reference
    columns = {name: [value for part in parts for value in part[name]] for name in LABELS.column_names}
    metrics["labelers"] = labelers
    if len(kept):
        metrics["mean_score"] = float(rewards[:, kept].mean())
        if members > 1:
            metrics["mean_member_std"] = float(rewards[:, kept].std(axis=0).mean())
    return StageOutput(table=pa.table(columns, schema=LABELS.schema), drops=drops, metrics=metrics)
