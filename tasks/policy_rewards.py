"""Stage ``label-policy``: label each sample with a policy's own reward for it — the rewards CREAM compares.

A policy scores a sample (x, y) by its log-likelihood, summed over the completion's tokens:

* with a ``reference`` model, the DPO implicit reward (Rafailov et al. 2023, "Direct Preference
  Optimization", without β, which changes no ranking)

      r(x, y) = Σ_t log π(y_t | x, y_<t) − Σ_t log π_ref(y_t | x, y_<t);

* without one, the log-likelihood Σ_t log π(y_t | x, y_<t).

``length_normalized`` divides either by the number of completion tokens |y| (the end-of-turn token
included when generation stopped there); unset, it is on exactly when there is no reference — CREAM's
rule ("CREAM: Consistency Regularized Self-Rewarding Language Models", Wang et al. 2024; the authors'
``rewarding.py``): the current model ranks a round's responses by its DPO reward against the model it
was trained from, and the model before it, which has no reference of its own, by the length-normalised
log-likelihood. Two such ``labels`` artifacts of the same samples are the ``consistency_labels`` and
``previous_labels`` inputs of the filter's ``consistency_confidence`` (:mod:`prefloop.tasks.filtering.cream`);
the loop writes them as ``RUN/round-K/policy-rewards`` and ``RUN/round-K/previous-policy-rewards``.

Output: one ``labels`` row per sample (``target_kind = "sample"``, ``target_id`` = sample id, ``prompt_id``),
under one labeler that names what scored: ``implicit-reward:<policy>-vs-<reference>``,
``log-likelihood:<policy>``, prefixed ``mean-`` when length-normalised (``<…>`` the first 12 characters
of the model artifact's id). A sample whose score is not finite goes to ``drops`` (``nonfinite_score``;
``no_completion_tokens`` for a normalised score of an empty, truncated completion).

Tokens are the training and evaluation ones (:mod:`prefloop.forward`): the prompt rendered by the chat
template when the policy's tokenizer has one (:mod:`prefloop.chat`), the completion's sampled ids where the
samples carry them and the policy's tokenizer has their fingerprint (else its text re-encoded), then the
end-of-turn token unless the sample was cut at its length limit (``finish_reason = "length"``: scored as
the prefix it is, as the evaluation's KL does). Policy and reference must share a tokenizer (the two sums
are over one token sequence), and every id must be inside both models' embeddings: otherwise a
:class:`~prefloop.stage.StageInputError` says which and how to fix it.

Data-parallel (``sharding``, :mod:`prefloop.sharding`): samples are cut into blocks of ``batch_size`` rows,
each block is one scoring call (rows in length groups, :func:`~prefloop.forward.grouped_sequence_logprobs`),
and the blocks' sums are merged in order, so the labels do not depend on the shard count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import LABELS, SAMPLES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import ShardedStageConfig, blocks, model_loading, run_sharded, sharding_metrics
from prefloop.stage import StageContext, StageInputError, StageOutput
from prefloop.tasks.registry import stage_spec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LABELER_VERSION = "1"
# The columns a block of samples carries to the scorer (a worker process gets them pickled).
_SCORED_COLUMNS = ["prompt", "completion", "completion_token_ids", "tokenizer_fingerprint", "finish_reason"]
MODEL_ID_LENGTH = 12  # characters of a model artifact's id in the labeler name


class PolicyRewardConfig(ShardedStageConfig):
    length_normalized: bool | None = Field(
        None, description="divide the score by the completion's token count; None: exactly when there is no "
                          "reference (CREAM: DPO reward with a reference, mean token log-prob without)")
    batch_size: int = Field(32, ge=1, description="samples per scoring call (one block of the sharded work)")


SPEC = stage_spec(
    "label-policy",
    version="1",
    config_model=PolicyRewardConfig,
    output_table=LABELS,
    description="Score samples by a policy's DPO implicit reward log π − log π_ref (or, without a reference, its "
                "mean token log-likelihood): CREAM's rewards for the filter's consistency_confidence.",
)


def labeler_name(policy_id: str, reference_id: str | None, length_normalized: bool) -> str:
    """What scored, e.g. ``implicit-reward:<policy>-vs-<reference>`` or ``mean-log-likelihood:<policy>``."""
    kind = "implicit-reward" if reference_id is not None else "log-likelihood"
    models = policy_id[:MODEL_ID_LENGTH]
    if reference_id is not None:
        models += f"-vs-{reference_id[:MODEL_ID_LENGTH]}"
    return f"{'mean-' if length_normalized else ''}{kind}:{models}"


def _load(ctx: StageContext, role: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from prefloop.tasks.training.artifacts import load_policy, training_device

    model, tokenizer = load_policy(ctx.model_dir(role))
    return model.to(training_device()).eval(), tokenizer


def _check_same_tokenizer(ctx: StageContext, tokenizer: PreTrainedTokenizerBase,
                          reference_tokenizer: PreTrainedTokenizerBase) -> None:
    from prefloop.forward import tokenizer_fingerprint

    mine, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(reference_tokenizer)
    if mine != theirs:
        raise StageInputError(
            f"label-policy: the policy {ctx.inputs['policy']} and the reference {ctx.inputs['reference']} have "
            f"different vocabularies ({mine} vs {theirs}), but the implicit reward log π − log π_ref compares the "
            "two models on one token sequence: give a reference of the policy's family (the model it was trained "
            "from), or no reference (length-normalised log-likelihood).")


def _check_ids_fit(ctx: StageContext, models: dict[str, PreTrainedModel], largest_id: int) -> None:
    for role, model in models.items():
        rows = model.get_input_embeddings().num_embeddings
        if largest_id >= rows:
            raise StageInputError(
                f"label-policy: the samples' tokens include id {largest_id}, but the {role} "
                f"{ctx.inputs[role]} has only {rows} embedding rows, so its vocabulary does not fit the tokens it "
                "would score: its tokenizer and weights disagree (a tokenizer with added tokens saved without "
                "resizing the embeddings?). Score with a model whose embedding covers its tokenizer.")


def _examples(tokenizer: PreTrainedTokenizerBase, part: pa.Table) -> tuple[list, list[bool]]:
    """The block's (prompt, completion) token sequences as training encodes them, without the end-of-turn
    token after a completion cut at its length limit; and per row, whether its sampled ids were used."""
    from prefloop.forward import EncodedExample, encode_examples, sampled_completion_ids

    columns = {name: part.column(name).to_pylist() for name in _SCORED_COLUMNS}
    sampled = sampled_completion_ids(tokenizer, columns["completion_token_ids"], columns["tokenizer_fingerprint"])
    encoded = encode_examples(tokenizer, columns["prompt"], columns["completion"], completion_ids=sampled)
    examples = [EncodedExample(example.token_ids[:-1], example.prompt_length) if finish == "length" else example
                for example, finish in zip(encoded, columns["finish_reason"], strict=True)]
    return examples, [ids is not None for ids in sampled]


def score_blocks(ctx: StageContext, parts: list[pa.Table], advance) -> list[np.ndarray]:
    """One shard: per block of samples, an array [4, rows] — Σ log π, Σ log π_ref (0 without a reference),
    completion tokens, and whether the sampled ids were used (1) or the text re-encoded (0). Loads the
    models once per call, holding :func:`~prefloop.sharding.model_loading`; called with no parts it only
    loads and checks them (a worker's warm-up)."""
    import torch

    from prefloop.forward import INFERENCE_GROUP_TOKENS, grouped_sequence_logprobs

    with model_loading():
        models = {"policy": _load(ctx, "policy")}
        if ctx.has("reference"):
            models["reference"] = _load(ctx, "reference")
    tokenizer = models["policy"][1]
    if "reference" in models:
        _check_same_tokenizer(ctx, tokenizer, models["reference"][1])
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    results = []
    for part in parts:
        examples, from_sampled = _examples(tokenizer, part)
        _check_ids_fit(ctx, {role: model for role, (model, _) in models.items()},
                       max(max(example.token_ids) for example in examples))
        sums = []
        with torch.inference_mode():
            for role in ("policy", "reference"):
                if role in models:
                    sums.append(grouped_sequence_logprobs(models[role][0], examples, pad_id,
                                                          INFERENCE_GROUP_TOKENS).double().cpu().numpy())
                else:
                    sums.append(np.zeros(len(examples)))
        results.append(np.stack([*sums, [example.completion_length for example in examples], from_sampled]))
        advance(part.num_rows)
    return results


def compute(ctx: StageContext) -> StageOutput:
    config: PolicyRewardConfig = ctx.config
    samples = ctx.read("samples", SAMPLES)
    if samples.num_rows == 0:
        raise UserError(f"samples {ctx.inputs['samples']} is empty: there is nothing to score")
    has_reference = ctx.has("reference")
    normalized = config.length_normalized if config.length_normalized is not None else not has_reference
    scored_rows = samples.select(_SCORED_COLUMNS)
    parts = [scored_rows.slice(run.start, len(run)) for run in blocks(samples.num_rows, config.batch_size)]
    scored, shards = run_sharded(ctx, config.sharding, parts, score_blocks, units=[p.num_rows for p in parts],
                                 description="samples (policy log-probs)")
    policy_sums, reference_sums, tokens, from_sampled = np.concatenate(scored, axis=1)
    rewards = policy_sums - reference_sums
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = rewards / tokens if normalized else rewards
    finite = np.isfinite(scores)
    bad = np.flatnonzero(~finite)
    reasons = ["no_completion_tokens" if normalized and tokens[i] == 0 else "nonfinite_score" for i in bad]
    drops = make_drops(samples, bad, reasons, "samples",
                       detail="the policy's score of this sample is not a finite number, so it is not labeled")
    labeler = labeler_name(ctx.inputs["policy"].id, ctx.inputs["reference"].id if has_reference else None, normalized)
    kept = np.flatnonzero(finite)
    sample_ids, prompt_ids = samples.column("sample_id").to_pylist(), samples.column("prompt_id").to_pylist()
    table = pa.table({
        "label_id": [content_id(labeler, LABELER_VERSION, "sample", sample_ids[i]) for i in kept],
        "target_id": [sample_ids[i] for i in kept],
        "target_kind": ["sample"] * len(kept),
        "prompt_id": [prompt_ids[i] for i in kept],
        "labeler": [labeler] * len(kept),
        "labeler_version": [LABELER_VERSION] * len(kept),
        "score": [float(scores[i]) for i in kept],
        "verdict": [None] * len(kept),
        "extracted_answer": [None] * len(kept),
    }, schema=LABELS.schema)
    metrics: dict[str, Any] = {
        "samples": samples.num_rows, "labeled": int(len(kept)), "labeler": labeler, "reference": has_reference,
        "length_normalized": normalized, "completions_from_sampled_ids": int(from_sampled.sum()),
        **sharding_metrics(config.sharding, shards)}
    if len(kept):
        metrics["mean_score"] = float(scores[kept].mean())
        metrics["mean_completion_tokens"] = float(tokens[kept].mean())
    return StageOutput(table=table, drops=drops, metrics=metrics)
