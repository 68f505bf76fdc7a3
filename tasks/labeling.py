"""Stage ``label``: score samples with a labeler — here the task's exact-answer verifier.

A verifier reads the final answer of a completion and compares it with the prompt's reference
answer: score 1.0 when equal, 0.0 otherwise (Tülu 3's RLVR uses the same verifiable signal).
Every label row carries the labeler's name and version.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import LABELS, PROMPTS, SAMPLES, make_drops
from prefloop.embedded import arithmetic
from prefloop.ids import content_id
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore

# name -> (version, extract answer from a completion)
VERIFIERS: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "exact_answer": ("1", arithmetic.extract_answer),
}


class LabelingConfig(StageConfig):
    labeler: str = Field("exact_answer", description=f"verifier to use; one of {sorted(VERIFIERS)}")


SPEC = StageSpec(
    name="label",
    version="1",
    config_model=LabelingConfig,
    output_kind="labels",
    inputs={"samples": "samples", "prompts": "prompts"},
    output_table=LABELS,
    description="Score every sample with the task's verifier.",
)


def compute(ctx: StageContext) -> StageOutput:
    config: LabelingConfig = ctx.config
    if config.labeler not in VERIFIERS:
        raise ValueError(f"unknown labeler '{config.labeler}'; valid labelers: {', '.join(sorted(VERIFIERS))}")
    version, extract = VERIFIERS[config.labeler]
    samples = ctx.read("samples", SAMPLES)
    prompts = ctx.read("prompts", PROMPTS)
    answers = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("reference_answer").to_pylist(), strict=True))
    rows: dict[str, list] = {k: [] for k in ("label_id", "target_id", "target_kind", "prompt_id", "labeler",
                                              "labeler_version", "score", "verdict", "extracted_answer")}
    unknown: list[int] = []
    columns = zip(
        samples.column("sample_id").to_pylist(), samples.column("prompt_id").to_pylist(),
        samples.column("completion").to_pylist(), samples.column("finish_reason").to_pylist(), strict=True,
    )
    for index, (sample_id, prompt_id, completion, finish) in enumerate(columns):
        reference = answers.get(prompt_id)
        if reference is None:
            unknown.append(index)
            continue
        extracted = extract(completion)
        if extracted is None:
            verdict = "truncated" if finish == "length" else "unparseable"
        else:
            verdict = "correct" if extracted == reference.strip() else "incorrect"
        rows["label_id"].append(content_id(config.labeler, version, sample_id))
        rows["target_id"].append(sample_id)
        rows["target_kind"].append("sample")
        rows["prompt_id"].append(prompt_id)
        rows["labeler"].append(config.labeler)
        rows["labeler_version"].append(version)
        rows["score"].append(1.0 if verdict == "correct" else 0.0)
        rows["verdict"].append(verdict)
        rows["extracted_answer"].append(extracted)
    if unknown and len(unknown) == samples.num_rows:
        raise ValueError("none of the samples' prompt_ids is in the prompts artifact: were they sampled from other prompts?")
    labeled = len(rows["label_id"])
    verdicts = {v: rows["verdict"].count(v) for v in ("correct", "incorrect", "unparseable", "truncated")}
    metrics = {"labeled": labeled, "unknown_prompt": len(unknown), **verdicts,
               "sample_accuracy": verdicts["correct"] / labeled if labeled else 0.0}
    drops = make_drops(samples, np.array(unknown, dtype=np.int64), ["unknown_prompt_id"] * len(unknown), "samples",
                       detail="sample's prompt_id is not in the prompts artifact, so it has no reference answer")
    return StageOutput(table=pa.table(rows), drops=drops, metrics=metrics)


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
