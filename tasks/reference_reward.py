"""Stage ``label-reference``: reward a completion by its similarity to the prompt's reference.

BLEUBERI (Chang et al. 2025, "BLEUBERI: BLEU is a surprisingly effective reward for instruction
following") uses a reference-based metric as the reward when a reference exists. Both metrics come
from sacrebleu (Post 2018), sentence level, rescaled from 0–100 to a score in [0, 1]:

* ``bleu`` — BLEU (Papineni et al. 2002): BP · exp(Σ_{n=1..4} ¼ log p_n), with p_n the clipped n-gram
  precisions and the brevity penalty BP = min(1, exp(1 − r/c)) for reference length r and
  hypothesis length c; ``effective_order`` drops the n-gram orders longer than the sentence
  (sacrebleu's recommendation for single sentences) so a short exact match scores 1;
* ``chrf`` — chrF (Popović 2015): the F_β score (β = 2) of character n-gram precision and recall,
  n = 1..6, averaged over n.

The reference is the prompt's ``reference_solution`` (or ``reference_answer``, per config). A sample
whose prompt is unknown is dropped as ``unknown_prompt_id``; one whose prompt has no reference as
``missing_reference``. Every label row carries the labeler (``bleu`` or ``chrf``) and its version,
which names the sacrebleu signature (tokenizer, smoothing, n-gram orders) so a change shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from sacrebleu.metrics import BLEU, CHRF

from prefloop.datasets_spec import LABELS, PROMPTS, SAMPLES, make_drops
from prefloop.ids import content_id
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore

Metric = Literal["bleu", "chrf"]


class ReferenceRewardConfig(StageConfig):
    metric: Metric = Field("bleu", description="bleu or chrf (sacrebleu, sentence level, scaled to [0, 1])")
    reference: Literal["reference_solution", "reference_answer"] = Field(
        "reference_solution", description="the prompts column holding the reference text")


SPEC = StageSpec(
    name="label-reference",
    version="1",
    config_model=ReferenceRewardConfig,
    output_kind="labels",
    inputs={"samples": "samples", "prompts": "prompts"},
    output_table=LABELS,
    description="Reward each sample by BLEU or chrF against its prompt's reference (BLEUBERI).",
)


def _scorer(metric: Metric) -> BLEU | CHRF:
    return BLEU(effective_order=True) if metric == "bleu" else CHRF()


def labeler_version(metric: Metric) -> str:
    """The stage version plus sacrebleu's signature of the metric (its settings and version)."""
    scorer = _scorer(metric)
    scorer.sentence_score("a", ["a"])  # sacrebleu states its signature only once it knows the reference count
    return f"{SPEC.version}+{scorer.get_signature().format(short=True)}"


def reference_rewards(completions: Sequence[str], references: Sequence[str], metric: Metric = "bleu") -> list[float]:
    """Sentence-level BLEU or chrF of each completion against its reference, divided by 100 (∈ [0, 1])."""
    scorer = _scorer(metric)
    return [scorer.sentence_score(hypothesis, [reference]).score / 100.0
            for hypothesis, reference in zip(completions, references, strict=True)]


def compute(ctx: StageContext) -> StageOutput:
    config: ReferenceRewardConfig = ctx.config
    samples = ctx.read("samples", SAMPLES)
    prompts = ctx.read("prompts", PROMPTS)
    if samples.num_rows == 0:
        raise ValueError(f"samples {ctx.inputs['samples']} is empty: there is nothing to score")
    references = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column(config.reference).to_pylist(),
                          strict=True))
    prompt_ids = samples.column("prompt_id").to_pylist()
    reasons: list[str | None] = []
    for prompt_id in prompt_ids:
        if prompt_id not in references:
            reasons.append("unknown_prompt_id")
        elif not references[prompt_id]:
            reasons.append("missing_reference")
        else:
            reasons.append(None)
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    if not kept:
        counts = {r: reasons.count(r) for r in set(reasons)}
        raise ValueError(f"no sample of {ctx.inputs['samples']} has a reference to compare with ({counts}): "
                         f"were they sampled from other prompts, or do the prompts lack '{config.reference}'?")
    bad = np.array([i for i, reason in enumerate(reasons) if reason is not None], dtype=np.int64)
    drops = make_drops(samples, bad, [reasons[i] for i in bad], "samples",
                       detail=f"no '{config.reference}' to compare the completion with")
    completions = samples.column("completion").to_pylist()
    sample_ids = samples.column("sample_id").to_pylist()
    scores = reference_rewards([completions[i] for i in kept], [references[prompt_ids[i]] for i in kept], config.metric)
    version = labeler_version(config.metric)
    table = pa.table({
        "label_id": [content_id(config.metric, version, sample_ids[i]) for i in kept],
        "target_id": [sample_ids[i] for i in kept],
        "target_kind": ["sample"] * len(kept),
        "prompt_id": [prompt_ids[i] for i in kept],
        "labeler": [config.metric] * len(kept),
        "labeler_version": [version] * len(kept),
        "score": scores,
        "verdict": [None] * len(kept),
        "extracted_answer": [None] * len(kept),
    }, schema=LABELS.schema)
    metrics = {"labeled": len(kept), "unknown_prompt_id": reasons.count("unknown_prompt_id"),
               "missing_reference": reasons.count("missing_reference"), "mean_score": float(np.mean(scores))}
    return StageOutput(table=table, drops=drops, metrics=metrics)


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
