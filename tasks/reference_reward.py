"""Reference-based rewards for the ``label`` stage: labelers ``bleu`` and ``chrf``.

BLEUBERI (Chang et al. 2025, "BLEUBERI: BLEU is a surprisingly effective reward for instruction
following") uses a reference-based metric as the reward when a reference exists. Both metrics come
from sacrebleu (Post 2018), sentence level, rescaled from 0–100 to a score in [0, 1]:

* ``bleu`` — BLEU (Papineni et al. 2002): BP · exp(Σ_n w_n log p_n), with p_n the clipped n-gram
  precisions (n = 1..4, uniform weights) and the brevity penalty BP = min(1, exp(1 − r/c)) for
  reference length r and hypothesis length c; ``effective_order`` leaves out the n-gram orders longer
  than the sentence (sacrebleu's advice for single sentences), so a short exact match scores 1;
* ``chrf`` — chrF (Popović 2015): the F_β score (β = 2) of character n-gram precision and recall,
  each averaged over n = 1..6.

Selected as ``label: {labeler: bleu}`` (or ``chrf``) with the ``prompts`` input; the setting
``reference`` names the prompts column holding the reference (``reference_solution`` by default, or
``reference_answer``). A sample whose prompt is unknown is dropped as ``unknown_prompt_id``; one whose
prompt has no reference as ``missing_reference``. The labeler version names sacrebleu's signature
(tokenizer, smoothing, n-gram orders, sacrebleu version), so a change of metric settings shows.

They are labelers of the ``label`` stage, not a stage of their own: they need exactly its inputs
(samples and prompts) and write one score per sample, which is what the stage's hook is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sacrebleu.metrics import BLEU, CHRF

from prefloop.errors import UserError
from prefloop.tasks.common.labelers import LabelBatch, Labeler, LabelRequest, register_labeler

Metric = Literal["bleu", "chrf"]
LABELER_RELEASE = "1"  # bump when this module's scoring changes


class ReferenceRewardSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: Literal["reference_solution", "reference_answer"] = Field(
        "reference_solution", description="the prompts column holding the reference text")


def _scorer(metric: Metric) -> BLEU | CHRF:
    return BLEU(effective_order=True) if metric == "bleu" else CHRF()


def labeler_version(metric: Metric) -> str:
    """This module's release plus sacrebleu's signature of the metric (its settings and version)."""
    scorer = _scorer(metric)
    scorer.sentence_score("a", ["a"])  # sacrebleu states its signature only once it knows the reference count
    return f"{LABELER_RELEASE}+{scorer.get_signature().format(short=True)}"


def reference_rewards(completions: Sequence[str], references: Sequence[str], metric: Metric = "bleu") -> list[float]:
    """Sentence-level BLEU or chrF of each completion against its reference, divided by 100 (∈ [0, 1])."""
    scorer = _scorer(metric)
    return [scorer.sentence_score(hypothesis, [reference]).score / 100.0
            for hypothesis, reference in zip(completions, references, strict=True)]


def _label_with(metric: Metric):
    def label(request: LabelRequest) -> LabelBatch:
        settings = request.settings or ReferenceRewardSettings()
        prompts, samples = request.prompts, request.samples
        references = dict(zip(prompts.column("prompt_id").to_pylist(),
                              prompts.column(settings.reference).to_pylist(), strict=True))
        batch = LabelBatch()
        kept: list[tuple[str, str, str, str]] = []
        columns = zip(samples.column("sample_id").to_pylist(), samples.column("prompt_id").to_pylist(),
                      samples.column("completion").to_pylist(), strict=True)
        for index, (sample_id, prompt_id, completion) in enumerate(columns):
            if prompt_id not in references:
                batch.drop(index, "unknown_prompt_id", "sample's prompt_id is not in the prompts artifact, so it has "
                           "no reference: pass the prompts it was sampled for")
            elif references[prompt_id] is None or not str(references[prompt_id]).strip():
                batch.drop(index, "missing_reference", f"the prompt has no '{settings.reference}' to compare with")
            else:
                kept.append((sample_id, prompt_id, completion, str(references[prompt_id])))
        if samples.num_rows and not kept:
            raise UserError(f"no sample has a reference to compare with: were they sampled from other prompts, or "
                             f"do the prompts lack '{settings.reference}'? (set settings.reference)")
        scores = reference_rewards([c for _, _, c, _ in kept], [r for _, _, _, r in kept], metric)
        for (sample_id, prompt_id, _, _), score in zip(kept, scores, strict=True):
            batch.add(sample_id, prompt_id, score)
        batch.metrics = {"mean_score": sum(scores) / len(scores) if scores else None}
        return batch

    return label


BLEU_LABELER = register_labeler(Labeler(
    name="bleu", version=labeler_version("bleu"), label=_label_with("bleu"), settings_model=ReferenceRewardSettings,
    needs=frozenset({"prompts"}), description="sentence BLEU against the prompt's reference (BLEUBERI), in [0, 1]"))
CHRF_LABELER = register_labeler(Labeler(
    name="chrf", version=labeler_version("chrf"), label=_label_with("chrf"), settings_model=ReferenceRewardSettings,
    needs=frozenset({"prompts"}), description="sentence chrF against the prompt's reference, in [0, 1]"))
