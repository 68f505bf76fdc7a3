"""Stage ``construct``: turn scored samples into preference pairs.

Best-of-n family (PF-PPO's best-worst and best-random): for each prompt, the sample with the
highest score is *chosen*; the lowest-scored (``best_vs_worst``) or a random lower-scored one
(``best_vs_random``) is *rejected*. When several samples share the top (or bottom) score one is
drawn with the stage's seed. Ties make no pair: if every sample of a prompt has the same score
there is nothing to prefer (elsewhere this bug makes chosen == rejected).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from prefloop.datasets_spec import LABELS, PREFERENCES, SAMPLES
from prefloop.ids import content_id
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore


class ConstructConfig(StageConfig):
    method: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    labeler: str | None = Field(None, description="use this labeler's scores (None: the only labeler present)")
    seed: int = 0


SPEC = StageSpec(
    name="construct",
    version="1",
    config_model=ConstructConfig,
    output_kind="preferences",
    inputs={"samples": "samples", "labels": "labels"},
    output_table=PREFERENCES,
    description="Pair each prompt's best sample with its worst (or a random worse one).",
)


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    return content_id("pair", prompt, chosen, rejected)


def _scores(labels: pa.Table, labeler: str | None) -> dict[str, float]:
    names = sorted(set(labels.column("labeler").to_pylist()))
    if labeler is None:
        if len(names) > 1:
            raise ValueError(f"labels come from several labelers {names}: set 'labeler' in the construct config")
        labeler = names[0] if names else None
    elif labeler not in names:
        raise ValueError(f"no labels from labeler '{labeler}' (present: {names})")
    chosen = labels.filter(pc.equal(labels.column("labeler"), labeler)) if labeler else labels
    return dict(zip(chosen.column("target_id").to_pylist(), chosen.column("score").to_pylist(), strict=True))


def compute(ctx: StageContext) -> StageOutput:
    config: ConstructConfig = ctx.config
    samples = ctx.read("samples", SAMPLES)
    scores = _scores(ctx.read("labels", LABELS), config.labeler)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in samples.select(["sample_id", "prompt_id", "prompt", "completion", "round", "policy_model_id"]).to_pylist():
        if row["sample_id"] in scores:
            row["score"] = scores[row["sample_id"]]
            by_prompt[row["prompt_id"]].append(row)
    rng = random.Random(config.seed)
    pairs: list[dict] = []
    ties = 0
    for prompt_id in sorted(by_prompt):
        group = by_prompt[prompt_id]
        best_score = max(r["score"] for r in group)
        worst_score = min(r["score"] for r in group)
        if best_score == worst_score:
            ties += 1
            continue
        chosen = rng.choice([r for r in group if r["score"] == best_score])
        if config.method == "best_vs_worst":
            rejected = rng.choice([r for r in group if r["score"] == worst_score])
        else:
            rejected = rng.choice([r for r in group if r["score"] < best_score])
        pairs.append({
            "pair_id": pair_id(chosen["prompt"], chosen["completion"], rejected["completion"]),
            "prompt_id": prompt_id,
            "prompt": chosen["prompt"],
            "chosen": chosen["completion"],
            "rejected": rejected["completion"],
            "score_chosen": chosen["score"],
            "score_rejected": rejected["score"],
            "margin": chosen["score"] - rejected["score"],
            "method": config.method,
            "confidence": None,
            "chosen_sample_id": chosen["sample_id"],
            "rejected_sample_id": rejected["sample_id"],
            "round": chosen["round"],
            "policy_model_id": chosen["policy_model_id"],
        })
    table = pa.Table.from_pylist(pairs, schema=PREFERENCES.schema) if pairs else PREFERENCES.schema.empty_table()
    metrics = {"prompts": len(by_prompt), "pairs_built": len(pairs), "prompts_all_tied": ties}
    return StageOutput(table=table, metrics=metrics)


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
