"""Stage ``label``: score samples with a labeler — a task's verifier, or any registered labeler.

Labelers live in a registry (:mod:`prefloop.tasks.common.labelers`); the stage looks the configured
one up, hands it the samples (and prompts, and a model artifact when it needs one) and writes what
it returns as ``labels`` rows, each carrying the labeler's name and version; ``settings`` is checked
against the labeler's own ``settings_model``.

The built-in ``verifier`` (also under its older name ``exact_answer``) implements verifiable
rewards (Tülu 3's RLVR, Lambert et al. 2024): the configured :class:`TaskDefinition` extracts the
final answer of a completion and checks it against the prompt's reference answer; score 1.0 when
they match, 0.0 otherwise. The embedded arithmetic task is the definition ``arithmetic``
(``A:`` line, exact match); see :mod:`prefloop.tasks.answers` for the others.

Rows that cannot be labeled go to the artifact's drops table with a named reason:
``unknown_prompt_id`` (no such prompt), ``missing_reference_answer``, ``unparseable_reference``
(the checker cannot read the reference), and — with ``on_unparseable: drop`` — ``unparseable_answer``
and ``truncated`` (no answer could be extracted from the completion). With the default
``score_zero`` such completions are kept as wrong answers (score 0, verdict ``unparseable`` or
``truncated``), which is right for a policy that is learning the answer format.

``sharding`` (a run option, :mod:`prefloop.sharding`) spreads a model labeler's work over shards (the
``reward_model`` labeler scores its blocks of samples in them); the verifier takes milliseconds and runs
in the stage's own process whatever it says.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError

from prefloop.datasets_spec import DROPS, LABELS, PROMPTS, SAMPLES, make_drops
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.sharding import ShardedStageConfig
from prefloop.stage import StageContext, StageInputError, StageOutput
from prefloop.tasks.answers import TaskDefinition, resolve_task
from prefloop.tasks.common.labelers import (
    LabelBatch,
    Labeler,
    LabelRequest,
    find_labeler,
    labeler_names,
    register_labeler,
)
from prefloop.tasks.registry import stage_spec


class LabelingConfig(ShardedStageConfig):
    labeler: str = Field("exact_answer", description="registered labeler: verifier (alias exact_answer), or a plugin")
    task: str | TaskDefinition = Field(
        "arithmetic", description="verifier: a task preset name (arithmetic, gsm8k, math, answer_line) or a definition "
        "{name, extract: {kind, prefix, pattern}, check: {kind, abs_tol, rel_tol, …}}")
    on_unparseable: Literal["score_zero", "drop"] = Field(
        "score_zero", description="a completion with no extractable answer: score 0 (a wrong answer) or drop it")
    settings: dict[str, Any] = Field(default_factory=dict, description="settings of a plugin labeler")


# ---------------------------------------------------------------------------------------------
# the built-in verifier
# ---------------------------------------------------------------------------------------------
def verify_samples(request: LabelRequest) -> LabelBatch:
    """Extract each completion's answer with the task definition and check it against the reference."""
    task = resolve_task(request.config.task)
    prompts = request.prompts
    references = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("reference_answer").to_pylist(),
                          strict=True))
    parsed_references: dict[str, Any] = {}
    batch = LabelBatch()
    samples = request.samples
    columns = zip(samples.column("sample_id").to_pylist(), samples.column("prompt_id").to_pylist(),
                  samples.column("completion").to_pylist(), samples.column("finish_reason").to_pylist(), strict=True)
    with request.ctx.progress(samples.num_rows, "samples") as advance:
        for index, (sample_id, prompt_id, completion, finish) in enumerate(columns):
            advance(1)
            if prompt_id not in references:
                batch.drop(index, "unknown_prompt_id", "sample's prompt_id is not in the prompts artifact, so it has "
                           "no reference answer: import or pass the prompts it was sampled for")
                continue
            reference = references[prompt_id]
            if reference is None or not str(reference).strip():
                batch.drop(index, "missing_reference_answer", "the prompt has no reference answer to check against")
                continue
            if prompt_id not in parsed_references:
                parsed_references[prompt_id] = task.parse_reference(str(reference))
            gold = parsed_references[prompt_id]
            if gold is None:
                batch.drop(index, "unparseable_reference",
                           f"task '{task.name}' ({task.check.kind} check) cannot read the reference answer {reference!r}")
                continue
            extracted = task.extract_answer(completion)
            if extracted is None:
                verdict = "truncated" if finish == "length" else "unparseable"
                if request.config.on_unparseable == "drop":
                    reason = "truncated" if verdict == "truncated" else "unparseable_answer"
                    batch.drop(index, reason, f"no answer found by the task's '{task.extract.kind}' extraction")
                    continue
            else:
                verdict = "correct" if task.is_correct(extracted, gold) else "incorrect"
            batch.add(sample_id, prompt_id, 1.0 if verdict == "correct" else 0.0, verdict, extracted)
    return batch


VERIFIER = register_labeler(
    Labeler(name="verifier", version="2", label=verify_samples, needs=frozenset({"prompts"}),
            description="the task definition's answer extraction and check against the reference answer"),
    "exact_answer",
)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def labeler_code(config: LabelingConfig) -> list:
    """The configured labeler's function: its code (a built-in module, or a user's plugin) is part of
    the output id, so fixing a labeler invalidates its old labels."""
    labeler = find_labeler(config.labeler)
    return [labeler.label] if labeler is not None else []


SPEC = stage_spec(
    "label",
    version="2",
    config_model=LabelingConfig,
    output_table=LABELS,
    code_dependencies=labeler_code,
    description="Score every sample with a labeler (the task's verifier by default).",
)


def _labeler(config: LabelingConfig, ctx: StageContext) -> tuple[Labeler, BaseModel | None]:
    labeler = find_labeler(config.labeler)
    if labeler is None:
        raise StageInputError(f"unknown labeler '{config.labeler}'; registered labelers: {', '.join(labeler_names())}")
    missing = sorted(role for role in labeler.needs if not ctx.has(role))
    if missing:
        raise StageInputError(f"labeler '{config.labeler}' needs the input(s) {missing}: pass "
                              + " ".join(f"--input {role}=REF" for role in missing))
    if labeler.settings_model is None:
        if config.settings:
            raise StageInputError(f"labeler '{config.labeler}' takes no settings, got {sorted(config.settings)}")
        return labeler, None
    try:
        return labeler, labeler.settings_model.model_validate(config.settings)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise StageInputError(f"labeler '{config.labeler}': invalid settings ({problems})") from None


def compute(ctx: StageContext) -> StageOutput:
    config: LabelingConfig = ctx.config
    labeler, settings = _labeler(config, ctx)
    if labeler is VERIFIER:
        resolve_task(config.task)  # an unknown preset fails before any work
    samples = ctx.read("samples", SAMPLES)
    prompts = ctx.read("prompts", PROMPTS) if ctx.has("prompts") else None
    batch = labeler.label(LabelRequest(samples=samples, prompts=prompts, config=config, settings=settings, ctx=ctx))
    reasons = Counter(reason for _, reason, _ in batch.dropped)
    if samples.num_rows and reasons.get("unknown_prompt_id") == samples.num_rows:
        raise UserError("none of the samples' prompt_ids is in the prompts artifact: were they sampled from other "
                         "prompts? (imported prompts and samples share ids when their prompt texts are equal)")
    version = labeler.version + (f"/{resolve_task(config.task).version}" if labeler is VERIFIER else "")
    count = len(batch.target_ids)
    table = pa.table({
        "label_id": [content_id(config.labeler, version, target) for target in batch.target_ids],
        "target_id": batch.target_ids,
        "target_kind": [batch.target_kind] * count,
        "prompt_id": pa.array(batch.prompt_ids, pa.string()),
        "labeler": [config.labeler] * count,
        "labeler_version": [version] * count,
        "score": pa.array(batch.scores, pa.float64()),
        "verdict": pa.array(batch.verdicts, pa.string()),
        "extracted_answer": pa.array(batch.extracted, pa.string()),
    })
    verdicts = Counter(v for v in batch.verdicts if v is not None)
    metrics: dict[str, Any] = {"labeled": count, **{v: verdicts.get(v, 0) for v in
                                                    ("correct", "incorrect", "unparseable", "truncated")}}
    if verdicts:
        metrics["sample_accuracy"] = verdicts.get("correct", 0) / count if count else 0.0
    metrics.update(batch.metrics)
    return StageOutput(table=table, drops=_drops(samples, batch.dropped), metrics=metrics)


def _drops(samples: pa.Table, dropped: list[tuple[int, str, str]]) -> pa.Table:
    parts = []
    for (reason, detail), rows in _group(dropped).items():
        parts.append(make_drops(samples, np.array(rows, dtype=np.int64), [reason] * len(rows), "samples", detail))
    return pa.concat_tables(parts) if parts else DROPS.schema.empty_table()


def _group(dropped: list[tuple[int, str, str]]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for index, reason, detail in dropped:
        groups.setdefault((reason, detail), []).append(index)
    return groups
