"""Stage ``evaluate``: held-out accuracy of a policy, and what the round's data looked like.

Greedy decoding on held-out prompts, verified exactly. Reported with standard errors:

* ``accuracy`` ± sqrt(p(1 − p)/n);
* ``accuracy_gain`` against a ``baseline`` evaluation (e.g. the SFT model's) on the *same*
  prompts: mean of d_i = correct_i − baseline_i with paired standard error std(d)/√n, the
  comparison that can separate a few points on 1000 prompts where unpaired errors cannot;
* ``mean_length`` (completion tokens) and ``truncated_rate``;
* data statistics of the round when its ``preferences`` are given: pairs built, kept, dropped
  (total and by reason).

Per-prompt outcomes are kept in the table ``eval_results`` so later rounds can be paired with it.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.backends.base import GenerationParams
from prefloop.backends.hf import HFBackend
from prefloop.datasets_spec import EVAL_RESULTS, METRICS, PROMPTS
from prefloop.embedded import arithmetic
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, done_total_callback, execute
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.sampling import select_prompts


class EvaluationConfig(StageConfig):
    split: str = "heldout"
    max_prompts: int | None = Field(1000, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    round: int = Field(0, ge=0)


SPEC = StageSpec(
    name="evaluate",
    version="1",
    config_model=EvaluationConfig,
    output_kind="metrics",
    inputs={"policy": "model", "prompts": "prompts", "baseline": "metrics", "preferences": "preferences"},
    optional_inputs=frozenset({"baseline", "preferences"}),
    output_table=METRICS,
    description="Held-out accuracy (greedy, verified), paired gain over a baseline, lengths and data stats.",
)


def paired_gain(correct: dict[str, bool], baseline: dict[str, bool]) -> tuple[float, float, int]:
    """Mean and standard error of d = correct − baseline over the prompts both evaluated."""
    shared = sorted(set(correct) & set(baseline))
    if not shared:
        return float("nan"), float("nan"), 0
    d = np.array([float(correct[p]) - float(baseline[p]) for p in shared])
    stderr = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), stderr, len(d)


def compute(ctx: StageContext) -> StageOutput:
    config: EvaluationConfig = ctx.config
    prompts = select_prompts(ctx.read("prompts", PROMPTS), config.split, config.max_prompts)
    backend = HFBackend.from_directory(ctx.model_dir("policy"), batch_size=config.batch_size)
    params = GenerationParams(n=1, temperature=0.0, max_new_tokens=config.max_new_tokens)
    texts = prompts.column("prompt").to_pylist()
    with ctx.progress(len(texts), "held-out prompts") as advance:
        completions = [group[0] for group in backend.generate(texts, params, progress=done_total_callback(advance))]
    answers = prompts.column("reference_answer").to_pylist()
    correct = [arithmetic.verify(c.text, a) for c, a in zip(completions, answers, strict=True)]
    prompt_ids = prompts.column("prompt_id").to_pylist()
    results = pa.table({
        "prompt_id": prompt_ids,
        "completion": [c.text for c in completions],
        "correct": correct,
        "completion_tokens": pa.array([c.num_tokens for c in completions], pa.int32()),
        "finish_reason": [c.finish_reason for c in completions],
    })
    n = len(correct)
    accuracy = sum(correct) / n
    rows: list[dict] = [
        {"metric": "accuracy", "value": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / n), "count": n},
        {"metric": "mean_length", "value": float(np.mean([c.num_tokens for c in completions])), "count": n},
        {"metric": "truncated_rate", "value": sum(c.finish_reason == "length" for c in completions) / n, "count": n},
    ]
    if ctx.has("baseline"):
        base = ctx.store.read_table(ctx.inputs["baseline"], "eval_results")
        baseline = dict(zip(base.column("prompt_id").to_pylist(), base.column("correct").to_pylist(), strict=True))
        gain, stderr, shared = paired_gain(dict(zip(prompt_ids, correct, strict=True)), baseline)
        rows.append({"metric": "accuracy_gain", "value": gain, "stderr": stderr, "count": shared})
    if ctx.has("preferences"):
        rows.extend(_data_stats(ctx))
    table = pa.Table.from_pylist(
        [{"round": config.round, "split": config.split, "policy_model_id": ctx.inputs["policy"].id,
          "stderr": None, "count": None, **row} for row in rows],
        schema=METRICS.schema,
    )
    metrics = {row["metric"]: row["value"] for row in rows}
    metrics |= {f"{row['metric']}_stderr": row["stderr"] for row in rows if row.get("stderr") is not None}
    return StageOutput(table=table, extra_tables={"eval_results": (results, EVAL_RESULTS)}, metrics=metrics)


def _data_stats(ctx: StageContext) -> list[dict]:
    """Pairs kept (this artifact), built (its input, if it was filtered) and dropped by reason."""
    store = ctx.store
    manifest = store.read_manifest(ctx.inputs["preferences"])
    built = manifest.rows
    source = manifest.inputs.get("preferences")
    if source is not None:
        built = store.read_manifest(ArtifactRef.parse(source)).rows
    rows = [
        {"metric": "pairs_built", "value": float(built)},
        {"metric": "pairs_kept", "value": float(manifest.rows)},
        {"metric": "pairs_dropped", "value": float(sum(manifest.drops.values()))},
    ]
    rows.extend({"metric": f"dropped:{reason}", "value": float(count)} for reason, count in sorted(manifest.drops.items()))
    return rows


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run, retries=1)
