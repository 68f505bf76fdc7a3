"""Stage ``train``: one round of preference optimisation (DPO and its family) on a pairs artifact.

Inputs: the filtered ``preferences``, the ``policy`` to start from, the ``reference`` model and,
optionally, the round's ``reference_logps`` (stage ``reference``: the reference's log-probs of every
pair, computed once per round) and ``off_policy`` pairs of an earlier round to mix in.

The iteration policy is explicit config, recorded in the manifest (``reference_policy``):

- ``fixed``: the SFT model is the reference in every round (MCTS-DPO);
- ``previous_round``: the policy that started the round (iterative DPO, SPIN, SPPO);
- ``mixture``: INPO's geometric mixture π_SFT^w · π_prev^(1−w) (Zhang et al. 2024), whose log-probs
  only exist as the ``reference_logps`` input (stage ``reference`` with ``mixture_with``);
- ``soft_sync``: TR-DPO (Gorbatovski et al. 2024): the reference starts as the given model and every
  ``sync_every`` steps becomes α·π_θ + (1 − α)·π_ref, so it is scored per step, not cached.

Data options: ``off_policy_ratio`` makes that share of the training pairs come from the
``off_policy`` input (sampled with the training seed); ``order: margin_descending`` makes every epoch
walk one fixed order, from the largest score margin to the smallest (ties in one seeded order). That
is not Curry-DPO (Pattnaik et al. 2024), whose curriculum is staged iterations, each stage's reference
reset to the previous stage's policy; the old name ``curriculum: margin`` is refused and says so.

The iteration policy must be defined for the loss (``configs.check_iteration_policy``): ``mixture``
only with ``ipo`` (INPO), ``sppo`` only with ``previous_round``, ``soft_sync`` only with a loss that
has a reference.

Label noise (losses that read a flip rate ε, i.e. cdpo and rdpo): ``label_flip_rate_source`` says
where ε comes from. ``confidence`` (default): per pair, ε = min(1 − confidence, 0.5) from the pairs'
``confidence`` column (MCTS-DPO's rule, Xie et al. 2024; stage ``pair-trees`` writes visit-count
confidences), pairs without one taking ``training.label_flip_rate``; ``config``: that number for
every pair; ``filter_estimate``: the ``estimated_flip_rate`` that stage ``filter`` wrote into the
input preferences' manifest. An ε above what the loss accepts is clamped (rdpo divides by 1 − 2ε, so
it is held at ``max_label_flip_rate``) and logged. The ε used is recorded in the model's metrics
(``label_flip_rate``, ``label_flip_rate_source``, and for per-pair values their mean and count).

Training checkpoints go into the store keyed by this stage's output id (``tasks/training/artifacts``),
so a killed run resumes from its last checkpoint when the same stage runs again; they are removed
once the model is published. ``training.distributed.processes`` trains data-parallel
(``tasks/training/distributed.py``; the process count is not part of the output id). The output is a new model artifact plus the per-step training log
(loss, implicit rewards and their margin, implicit-reward accuracy, KL estimate, learning rate,
gradient norm).

Tokens (version 4): pairs that carry the ids their policy sampled (``chosen_token_ids`` /
``rejected_token_ids``, written by construct) are trained on exactly those ids when the policy's
tokenizer is the one that sampled them (same ``tokenizer_fingerprint``); other pairs, and every pair
when the tokenizer differs, are encoded from their text
(:func:`~prefloop.tasks.training.recipes.dpo.pair_completion_ids`), as the reference stage does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from prefloop.datasets_spec import PREFERENCES, TRAIN_LOG
from prefloop.datasets_spec.schemas import REFERENCE_LOGPS
from prefloop.errors import UserError
from prefloop.lazy import deferred_import
from prefloop.stage import StageContext, StageOutput, done_total_callback
from prefloop.tasks.common.confidence import pair_flip_rates
from prefloop.tasks.common.iteration import ReferencePolicy
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import (
    StoreCheckpointer,
    clear_checkpoints,
    load_policy,
    save_model_dir,
    summarize,
    train_log_table,
    training_device,
)
from prefloop.tasks.training.configs import DPOConfig, TrainingStageConfig, check_iteration_policy
from prefloop.tasks.training.distributed import run_info, train_with
from prefloop.tasks.training.losses import get_loss_spec

if TYPE_CHECKING:
    import torch

    from prefloop.tasks.training.recipes.dpo import PreparedPairs, ReferenceLogps
else:
    torch = deferred_import("torch")

LabelFlipRateSource = Literal["confidence", "config", "filter_estimate"]


class TrainConfig(TrainingStageConfig):
    training: DPOConfig = Field(default_factory=DPOConfig)
    reference_policy: ReferencePolicy = Field(
        "fixed",
        description="fixed (SFT model), previous_round, mixture (INPO geometric mixture of SFT and the previous "
        "policy) or soft_sync (TR-DPO); the flow picks the reference inputs from it",
    )
    mixture_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="mixture: weight w of the SFT model in π_SFT^w·π_prev^(1−w) (INPO's τ/η)"
    )
    sync_alpha: float = Field(
        0.6, gt=0.0, le=1.0, description="soft_sync: α of π_ref ← α·π + (1−α)·π_ref (TR-DPO; TRL default 0.6)"
    )
    sync_every: int = Field(
        512, ge=1, description="soft_sync: optimizer steps between reference updates (TR-DPO τ; TRL default 512)"
    )
    off_policy_ratio: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="share of the training pairs drawn from the 'off_policy' input (earlier rounds' pairs); 0: none",
    )
    order: Literal["shuffled", "margin_descending"] = Field(
        "shuffled",
        description="shuffled: each epoch a seeded permutation of the pairs; margin_descending: every epoch the "
        "same order, largest score margin first (ties in one seeded order). Not Curry-DPO's staged curriculum",
    )
    label_flip_rate_source: LabelFlipRateSource = Field(
        "confidence",
        description="where cdpo/rdpo take the label-flip rate ε from: confidence (per pair ε = min(1 − confidence, "
        "0.5) from the pairs' confidence column, MCTS-DPO; pairs without one use training.label_flip_rate), "
        "config (training.label_flip_rate for every pair) or filter_estimate (the estimated_flip_rate that the "
        "filter stage wrote into the input preferences' manifest; needs a filter run with an ensemble or confidences)",
    )
    max_label_flip_rate: float = Field(
        0.4, gt=0.0, lt=0.5,
        description="ceiling for an ε taken from the data (confidence, filter_estimate) when the loss needs ε < 0.5: "
        "rdpo divides by 1 − 2ε, so 0.4 scales its loss by at most 5×; cdpo accepts 0.5 and ignores this",
    )
    round: int = Field(1, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _curriculum_was_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "curriculum" in data:
            value = data["curriculum"]
            instead = "order: margin_descending" if value == "margin" else "order: shuffled (the default)"
            raise UserError(
                f"train.curriculum: {value} was renamed: it replayed one fixed largest-margin-first order every "
                "epoch, which is not Curry-DPO (Pattnaik et al. 2024: staged iterations, each stage's reference "
                f"reset to the previous stage's policy; issue 17, item 6). Write {instead} instead"
            )
        return data


SPEC = stage_spec(
    "train",
    version="4",
    config_model=TrainConfig,
    after_publish=clear_checkpoints,
    description="Preference optimisation (DPO family) of the policy against a reference.",
)

PAIR_COLUMNS = ["pair_id", "prompt", "chosen", "rejected", "margin", "confidence", "chosen_token_ids",
                "rejected_token_ids", "tokenizer_fingerprint"]


def _read_pairs(ctx: StageContext, role: str) -> pa.Table:
    table = ctx.read(role, PREFERENCES)
    return table.select([name for name in PAIR_COLUMNS if name in table.column_names])


def training_pairs(ctx: StageContext, config: TrainConfig) -> tuple[pa.Table, int]:
    """The round's pairs plus, with ``off_policy_ratio`` r > 0, off-policy pairs making up a share r of
    the whole (as many as the input holds, at most r/(1−r) per on-policy pair), drawn with the
    training seed. Returns the table and the number of off-policy pairs in it."""
    pairs = _read_pairs(ctx, "preferences")
    if pairs.num_rows == 0:
        raise UserError(
            f"preferences {ctx.inputs['preferences']} is empty: there is nothing to train on. "
            "Sample more prompts or completions per prompt, or relax the filter."
        )
    if config.off_policy_ratio == 0.0 or not ctx.has("off_policy"):
        if config.off_policy_ratio > 0.0 and config.round > 1:
            raise UserError(
                f"train: off_policy_ratio is {config.off_policy_ratio} but no 'off_policy' input was given: pass "
                "an earlier round's preferences as off_policy=REF, or set off_policy_ratio to 0"
            )
        return pairs, 0
    on_policy_ids = set(pairs.column("pair_id").to_pylist())
    earlier = _read_pairs(ctx, "off_policy")
    earlier = earlier.filter(pa.array([pid not in on_policy_ids for pid in earlier.column("pair_id").to_pylist()], pa.bool_()))
    for name in pairs.column_names:  # an optional column (margin, confidence, ids) earlier pairs lack: null there
        if name not in earlier.column_names:
            earlier = earlier.append_column(name, pa.nulls(earlier.num_rows, pairs.schema.field(name).type))
    wanted = round(config.off_policy_ratio / (1.0 - config.off_policy_ratio) * pairs.num_rows)
    generator = torch.Generator().manual_seed(config.training.seed)
    chosen = sorted(torch.randperm(earlier.num_rows, generator=generator)[: min(wanted, earlier.num_rows)].tolist())
    mixed = earlier.take(pa.array(chosen, pa.int64())).select(pairs.column_names).cast(pairs.schema)
    return pa.concat_tables([pairs, mixed]), len(chosen)


def margin_descending_order(margins: list[float | None], seed: int) -> list[int]:
    """Pair indices from the largest margin to the smallest; equal margins in a seeded random order
    (with a verifier's ±1 scores every margin ties, so this is one seeded permutation)."""
    if any(margin is None for margin in margins):
        raise UserError(
            "order 'margin_descending' needs a margin for every pair, but some are null: label the pairs with a "
            "scorer that gives margins, or set order: shuffled"
        )
    tie_break = torch.randperm(len(margins), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(range(len(margins)), key=lambda index: (-margins[index], tie_break[index]))


def label_flip_rates(
    ctx: StageContext, config: TrainConfig, pairs: pa.Table
) -> tuple[DPOConfig, list[float] | None, dict[str, float | str]]:
    """ε for a loss that reads it (module docstring), clamped into the loss's range: the training config
    with the global ε, the per-pair values from confidences (or None), and the metrics that record them."""
    import logging

    logger = logging.getLogger("prefloop")
    training = config.training
    if not get_loss_spec(training.loss).uses_label_flip_rate:
        if config.label_flip_rate_source == "filter_estimate":
            raise UserError(
                f"train: label_flip_rate_source is 'filter_estimate' but loss '{training.loss}' does not read a "
                "label-flip rate: use loss cdpo or rdpo, or set label_flip_rate_source back to 'confidence'"
            )
        return training, None, {}
    # The largest ε the loss takes: 0.5 for cdpo (a label with no information), below 0.5 for rdpo.
    ceiling = 0.5 if get_loss_spec(training.loss).label_flip_rate_may_be_half else config.max_label_flip_rate
    source = config.label_flip_rate_source
    metrics: dict[str, float | str] = {"label_flip_rate_source": source}
    if source == "filter_estimate":
        estimate = ctx.store.read_manifest(ctx.inputs["preferences"]).metrics.get("estimated_flip_rate")
        if estimate is None:
            raise UserError(
                f"train: label_flip_rate_source is 'filter_estimate' but preferences {ctx.inputs['preferences']} "
                "has no 'estimated_flip_rate' in its manifest: only stage 'filter' writes it, and only with an "
                "ensemble_labels input (a reward-model ensemble's labels, stage label-rm) or pairs that carry a "
                "confidence. Train on such a filter's output, or set label_flip_rate_source: config and a number "
                "in training.label_flip_rate"
            )
        epsilon = min(max(float(estimate), 0.0), ceiling)
        if epsilon != estimate:
            logger.warning("train: the filter's estimated label-flip rate %.4f is outside [0, %g], the range loss "
                           "'%s' takes here; training with ε = %g", estimate, ceiling, training.loss, epsilon)
        metrics |= {"estimated_flip_rate": float(estimate), "label_flip_rate": epsilon}
        return training.model_copy(update={"label_flip_rate": epsilon}), None, metrics
    fallback = training.label_flip_rate
    metrics["label_flip_rate"] = fallback
    confidences = pairs.column("confidence").to_pylist() if "confidence" in pairs.column_names else []
    if source == "config" or all(value is None for value in confidences):
        return training, None, metrics
    # MCTS-DPO's ε = min(1 − conf, 0.5); a loss that needs ε < 0.5 (rdpo) gets the ceiling instead.
    from_confidence = pair_flip_rates(confidences)
    known = [value for value in from_confidence if value is not None]
    clamped = sum(value > ceiling for value in known)
    if clamped:
        logger.warning("train: %d of %d pairs have ε = min(1 − confidence, 0.5) above %g, the most loss '%s' takes "
                       "here (max_label_flip_rate); they train with ε = %g",
                       clamped, len(known), ceiling, training.loss, ceiling)
    per_pair = [fallback if value is None else min(value, ceiling) for value in from_confidence]
    metrics |= {"label_flip_rate_pairs_from_confidence": len(known),
                "label_flip_rate_clamped_pairs": clamped,
                "label_flip_rate_mean": sum(per_pair) / len(per_pair)}
    return training, per_pair, metrics


def cached_reference_logps(ctx: StageContext, pair_ids: list[str], prepared: PreparedPairs) -> tuple[ReferenceLogps, list[int]]:
    """Reference log-probs of the training pairs from the ``reference_logps`` input, and the indices of
    pairs it does not cover. Token counts must agree with this stage's tokenisation."""
    table = ctx.read("reference_logps", REFERENCE_LOGPS)
    rows = {pair_id: index for index, pair_id in enumerate(table.column("pair_id").to_pylist())}
    chosen_logp, rejected_logp = table.column("chosen_logp").to_pylist(), table.column("rejected_logp").to_pylist()
    chosen_tokens = table.column("chosen_tokens").to_pylist() if "chosen_tokens" in table.column_names else None
    rejected_tokens = table.column("rejected_tokens").to_pylist() if "rejected_tokens" in table.column_names else None
    chosen, rejected, missing = [], [], []
    for index, pair_id in enumerate(pair_ids):
        row = rows.get(pair_id)
        if row is None:
            missing.append(index)
            chosen.append(0.0)
            rejected.append(0.0)
            continue
        if chosen_tokens is not None and (chosen_tokens[row] != prepared.chosen[index].completion_length
                                          or rejected_tokens[row] != prepared.rejected[index].completion_length):
            raise UserError(
                f"reference_logps {ctx.inputs['reference_logps']} scored pair {pair_id} over a different number of "
                "tokens than train tokenises: it was computed with another max_length or tokenizer. Rerun stage "
                "'reference' with max_length equal to train.training.max_length"
            )
        chosen.append(chosen_logp[row])
        rejected.append(rejected_logp[row])
    from prefloop.tasks.training.recipes.dpo import ReferenceLogps

    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64).float()  # noqa: E731
    return ReferenceLogps(chosen=as_tensor(chosen), rejected=as_tensor(rejected)), missing


def compute(ctx: StageContext) -> StageOutput:
    from prefloop.tasks.training.optim import num_steps_for
    from prefloop.tasks.training.recipes.dpo import (
        PreparedPairs,
        SoftSync,
        pair_completion_ids,
        prepare_pairs,
        reference_logprobs,
        train_dpo,
    )

    config: TrainConfig = ctx.config
    pairs_table, off_policy_pairs = training_pairs(ctx, config)
    pairs = list(zip(*(pairs_table.column(name).to_pylist() for name in ("prompt", "chosen", "rejected")),
                     strict=True))
    fixed_order = None
    if config.order == "margin_descending":
        margins = pairs_table.column("margin").to_pylist() if "margin" in pairs_table.column_names else [None]
        fixed_order = margin_descending_order(margins, config.training.seed)
    training, per_pair_flip_rates, flip_rate_metrics = label_flip_rates(ctx, config, pairs_table)
    policy, tokenizer = load_policy(ctx.model_dir("policy"))
    policy.to(training_device())
    chosen_ids, rejected_ids = pair_completion_ids(tokenizer, pairs_table)
    prepared = prepare_pairs(tokenizer, pairs, config.training.max_length, per_pair_flip_rates, chosen_ids, rejected_ids)
    soft_sync = None
    reference_logps = None
    missing: list[int] = []
    if config.reference_policy == "soft_sync":
        soft_sync = SoftSync(alpha=config.sync_alpha, every=config.sync_every)
    elif ctx.has("reference_logps"):
        reference_logps, missing = cached_reference_logps(ctx, pairs_table.column("pair_id").to_pylist(), prepared)
        if missing and config.reference_policy == "mixture":
            raise UserError(
                f"reference_logps {ctx.inputs['reference_logps']} lacks {len(missing)} of the training pairs and "
                "the mixture reference cannot be scored here: rerun stage 'reference' with the same preferences "
                "and off_policy inputs"
            )
    elif config.reference_policy == "mixture":
        raise UserError(
            "reference_policy 'mixture' needs the 'reference_logps' input (stage 'reference' run with "
            "mixture_with=the previous policy and mixture_weight): the mixture has no weights of its own"
        )
    # Checked here, not in TrainConfig: a loop config's train section leaves reference_policy to the loop.
    check_iteration_policy(config.reference_policy, config.training.loss)
    # The reference model is loaded only when something must be scored with it.
    reference = None
    if (soft_sync is not None or reference_logps is None or missing
            or get_loss_spec(config.training.loss).needs_kl_to_reference):
        reference, _ = load_policy(ctx.model_dir("reference"))
        reference.to(training_device())
    if missing:
        subset = PreparedPairs([prepared.chosen[i] for i in missing], [prepared.rejected[i] for i in missing])
        scored = reference_logprobs(reference, subset, tokenizer.pad_token_id)
        reference_logps.chosen[missing] = scored.chosen.cpu()
        reference_logps.rejected[missing] = scored.rejected.cpu()
    checkpointer = StoreCheckpointer(ctx.store, ctx.output_id, SPEC.name, SPEC.version)
    with ctx.progress(num_steps_for(len(pairs), config.training), "steps") as advance:
        steps = train_with(train_dpo, policy, reference, tokenizer, pairs, training,
                           distributed=training.distributed, progress=done_total_callback(advance),
                           reference_logps=reference_logps, prepared=prepared, fixed_order=fixed_order,
                           soft_sync=soft_sync, checkpointer=checkpointer)
    from_artifact = len(pairs) - len(missing) if reference_logps is not None else 0
    metrics = {"pairs": len(pairs), "off_policy_pairs": off_policy_pairs,
               "completions_from_sampled_ids": sum(ids is not None for ids in chosen_ids + rejected_ids),
               "reference_logps_from_artifact": from_artifact, **flip_rate_metrics, **summarize(steps),
               **run_info(training.distributed)}
    if checkpointer.resumed_from is not None:
        metrics["resumed_from_step"] = checkpointer.resumed_from
    return StageOutput(
        files_dir=save_model_dir(policy, tokenizer),
        extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)},
        metrics=metrics,
    )
