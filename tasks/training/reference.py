"""Stage ``reference``: the DPO reference's log-probs of a round's pairs, computed once and stored.

The reference is frozen for a round (``fixed``, ``previous_round`` and ``mixture`` policies), so its
sequence log-probs log π_ref(y|x) of every chosen and rejected completion are computed in one
inference pass and written as a ``reference_logps`` table keyed by ``pair_id``. The ``train`` stage
reads them instead of running the reference model every step, and a rerun (another loss, another
learning rate, a resumed run) finds them in the store.

With a ``mixture_with`` model the stored values are those of INPO's geometric mixture
(Zhang et al. 2024, "Iterative Nash Policy Optimization"):

    log π_mix(y|x) = w · log π_ref(y|x) + (1 − w) · log π_mix_with(y|x)      (w = ``mixture_weight``)

up to a per-prompt normaliser that cancels in every DPO-family log-ratio difference.

Pairs of an ``off_policy`` input (earlier rounds' pairs that train may mix in) are scored too, so
every pair train can draw has its reference log-probs here. Tokenisation and ``max_length`` must
match the train stage's; train checks the stored token counts against its own. Both take a pair's
sampled ids (``chosen_token_ids`` / ``rejected_token_ids``) where the reference's tokenizer is the one
that sampled them, and encode the text otherwise (version 2;
:func:`~prefloop.tasks.training.recipes.dpo.pair_completion_ids`): the reference scores the sequences
the policy sampled and will be trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES
from prefloop.datasets_spec.schemas import REFERENCE_LOGPS
from prefloop.errors import UserError
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.registry import stage_spec
from prefloop.tasks.training.artifacts import load_policy, training_device

if TYPE_CHECKING:
    from prefloop.tasks.training.recipes.dpo import PreparedPairs, ReferenceLogps


class ReferenceConfig(StageConfig):
    mixture_weight: float | None = Field(
        None, ge=0.0, le=1.0,
        description="INPO: weight w of 'reference' in the geometric mixture with 'mixture_with' (w = τ/η); "
        "None: the 'reference' model alone",
    )
    max_length: int | None = Field(None, ge=2, description="must equal train.training.max_length")


SPEC = stage_spec(
    "reference",
    version="2",
    config_model=ReferenceConfig,
    output_table=REFERENCE_LOGPS,
    description="Sequence log-probs of every pair under the round's reference (or INPO mixture), computed once.",
)


def pair_rows(ctx: StageContext, role: str) -> pa.Table:
    table = ctx.read(role, PREFERENCES)
    return table.select(["pair_id", "prompt", "chosen", "rejected", "chosen_token_ids", "rejected_token_ids",
                         "tokenizer_fingerprint"])


def compute(ctx: StageContext) -> StageOutput:
    from prefloop.tasks.training.recipes.dpo import (
        geometric_mixture,
        pair_completion_ids,
        prepare_pairs,
        reference_logprobs,
    )

    config: ReferenceConfig = ctx.config
    if (config.mixture_weight is None) != (not ctx.has("mixture_with")):
        raise UserError(
            "stage 'reference': a geometric mixture needs both the 'mixture_with' model input and "
            "config mixture_weight; give both (reference_policy: mixture) or neither"
        )
    tables = [pair_rows(ctx, "preferences")]
    if ctx.has("off_policy"):
        tables.append(pair_rows(ctx, "off_policy"))
    pairs_table = pa.concat_tables(tables)
    # An off-policy pair may recur across rounds: score each pair_id once.
    seen: set[str] = set()
    keep = [not (pair_id in seen or seen.add(pair_id)) for pair_id in pairs_table.column("pair_id").to_pylist()]
    pairs_table = pairs_table.filter(pa.array(keep, pa.bool_()))
    if pairs_table.num_rows == 0:
        raise UserError(
            f"preferences {ctx.inputs['preferences']} is empty: there are no pairs to score. "
            "Sample more prompts or completions per prompt, or relax the filter."
        )
    pairs = list(zip(*(pairs_table.column(name).to_pylist() for name in ("prompt", "chosen", "rejected")),
                     strict=True))
    reference, tokenizer = load_policy(ctx.model_dir("reference"))
    reference.to(training_device())
    chosen_ids, rejected_ids = pair_completion_ids(tokenizer, pairs_table)
    prepared = prepare_pairs(tokenizer, pairs, config.max_length, chosen_ids=chosen_ids, rejected_ids=rejected_ids)
    logps = reference_logprobs(reference, prepared, tokenizer.pad_token_id)
    if config.mixture_weight is not None:
        other, _ = load_policy(ctx.model_dir("mixture_with"))
        other.to(training_device())
        logps = geometric_mixture(logps, reference_logprobs(other, prepared, tokenizer.pad_token_id),
                                  config.mixture_weight)
    return StageOutput(table=reference_table(pairs_table.column("pair_id").to_pylist(), logps, prepared),
                       metrics={"pairs": pairs_table.num_rows,
                                "completions_from_sampled_ids": sum(ids is not None for ids in chosen_ids + rejected_ids),
                                "mean_chosen_logp": float(logps.chosen.double().mean()),
                                "mean_rejected_logp": float(logps.rejected.double().mean())})


def reference_table(pair_ids: list[str], logps: ReferenceLogps, prepared: PreparedPairs) -> pa.Table:
    return pa.table({
        "pair_id": pa.array(pair_ids, pa.string()),
        "chosen_logp": pa.array(logps.chosen.double().tolist(), pa.float64()),
        "rejected_logp": pa.array(logps.rejected.double().tolist(), pa.float64()),
        "chosen_tokens": pa.array([e.completion_length for e in prepared.chosen], pa.int32()),
        "rejected_tokens": pa.array([e.completion_length for e in prepared.rejected], pa.int32()),
    })
