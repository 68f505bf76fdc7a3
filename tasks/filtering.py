"""Stage ``filter``: remove noisy or useless preference pairs, each with a named reason.

Filters run in a fixed order and the first that rejects a row names its reason:

* ``chosen_equals_rejected`` — identical texts teach nothing (and make DPO's h = 0);
* ``tie`` — |score_chosen − score_rejected| ≤ ``min_margin``: no preference signal;
* ``duplicate_pair`` — same prompt, chosen and rejected after normalising whitespace (the first
  occurrence is kept).

Every dropped row lands in the artifact's ``drops`` table and the counts in its manifest.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, make_drops
from prefloop.ids import content_id
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore

_WHITESPACE = re.compile(r"\s+")


class FilterConfig(StageConfig):
    drop_chosen_equals_rejected: bool = True
    min_margin: float | None = Field(0.0, ge=0.0, description="drop pairs whose |margin| <= this (None: keep ties)")
    drop_duplicates: bool = True


SPEC = StageSpec(
    name="filter",
    version="1",
    config_model=FilterConfig,
    output_kind="preferences",
    inputs={"preferences": "preferences"},
    output_table=PREFERENCES,
    description="Drop pairs with chosen == rejected, ties and duplicates; record every drop with its reason.",
)


def normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def filter_reasons(pairs: pa.Table, config: FilterConfig) -> list[str | None]:
    """The reason each row is dropped, or None to keep it."""
    prompts = pairs.column("prompt").to_pylist()
    chosen = pairs.column("chosen").to_pylist()
    rejected = pairs.column("rejected").to_pylist()
    score_chosen = pairs.column("score_chosen").to_pylist()
    score_rejected = pairs.column("score_rejected").to_pylist()
    seen: set[str] = set()
    reasons: list[str | None] = []
    for prompt, good, bad, s_good, s_bad in zip(prompts, chosen, rejected, score_chosen, score_rejected, strict=True):
        if config.drop_chosen_equals_rejected and normalise(good) == normalise(bad):
            reasons.append("chosen_equals_rejected")
            continue
        if config.min_margin is not None and s_good is not None and s_bad is not None \
                and abs(s_good - s_bad) <= config.min_margin:
            reasons.append("tie")
            continue
        if config.drop_duplicates:
            key = content_id(normalise(prompt), normalise(good), normalise(bad))
            if key in seen:
                reasons.append("duplicate_pair")
                continue
            seen.add(key)
        reasons.append(None)
    return reasons


def compute(ctx: StageContext) -> StageOutput:
    config: FilterConfig = ctx.config
    pairs = ctx.read("preferences", PREFERENCES)
    reasons = filter_reasons(pairs, config)
    keep = np.array([r is None for r in reasons], dtype=bool)
    dropped = np.flatnonzero(~keep)
    drops = make_drops(pairs, dropped, [reasons[i] for i in dropped], "preferences", detail="filter stage")
    kept = pairs.filter(pa.array(keep))
    metrics = {"pairs_in": pairs.num_rows, "pairs_kept": kept.num_rows, "pairs_dropped": int(len(dropped))}
    return StageOutput(table=kept, drops=drops, metrics=metrics)


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
