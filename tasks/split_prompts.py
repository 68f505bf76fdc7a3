"""Stage ``split-prompts``: a deterministic held-out split of a prompts artifact, made by prompt hash.

Imported prompt sets often come without a split, or with one that does not suit an iterative run.
This stage rewrites the ``split`` column: a prompt is ``heldout`` when the hash of its prompt id
(and ``seed``) is among the smallest — the ``heldout_size`` smallest, or those below
``heldout_fraction`` of the hash range — and ``train`` otherwise. The split depends only on the
prompt ids, never on row order or on which file a prompt came from, so re-importing the same
prompts in another order gives the same split; with ``heldout_fraction`` a prompt keeps its split
when more prompts are added. Held-out prompts are never trained on: the loop samples and builds
pairs from ``train`` only and evaluates on ``heldout``.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field, model_validator

from prefloop.datasets_spec import PROMPTS
from prefloop.errors import UserError
from prefloop.ids import content_id
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.registry import stage_spec


class SplitPromptsConfig(StageConfig):
    heldout_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="share of the hash range held out (a prompt keeps its split as prompts "
        "are added); set this or heldout_size")
    heldout_size: int | None = Field(None, ge=1, description="exactly this many prompts held out (the smallest hashes)")
    seed: int = Field(0, description="another seed gives another, equally deterministic, split")

    @model_validator(mode="after")
    def _one_size(self) -> SplitPromptsConfig:
        if (self.heldout_fraction is None) == (self.heldout_size is None):
            raise UserError("set exactly one of heldout_fraction (e.g. 0.1) and heldout_size (e.g. 500)")
        return self


SPEC = stage_spec(
    "split-prompts",
    version="1",
    config_model=SplitPromptsConfig,
    output_table=PROMPTS,
    description="Rewrite a prompts artifact's train/held-out split deterministically by prompt hash.",
)


def hash_position(prompt_id: str, seed: int) -> float:
    """Where a prompt falls in the hash range, uniform in [0, 1)."""
    return int(content_id("split", seed, prompt_id), 16) / 16.0**16


def heldout_mask(prompt_ids: list[str], config: SplitPromptsConfig) -> list[bool]:
    positions = [hash_position(prompt_id, config.seed) for prompt_id in prompt_ids]
    if config.heldout_fraction is not None:
        return [position < config.heldout_fraction for position in positions]
    if config.heldout_size >= len(prompt_ids):
        raise UserError(f"heldout_size {config.heldout_size} would hold out all {len(prompt_ids)} prompts and leave "
                         "none to train on: choose a smaller heldout_size or a heldout_fraction")
    # Ties (equal positions) are broken by prompt id, so the size is exact and the order irrelevant.
    smallest = set(sorted(range(len(prompt_ids)), key=lambda i: (positions[i], prompt_ids[i]))[: config.heldout_size])
    return [index in smallest for index in range(len(prompt_ids))]


def compute(ctx: StageContext) -> StageOutput:
    config: SplitPromptsConfig = ctx.config
    prompts = ctx.read("prompts", PROMPTS)
    if prompts.num_rows == 0:
        raise UserError("the prompts artifact is empty: there is nothing to split")
    before = prompts.column("split").to_pylist()
    heldout = heldout_mask(prompts.column("prompt_id").to_pylist(), config)
    splits = ["heldout" if held else "train" for held in heldout]
    table = prompts.set_column(prompts.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    return StageOutput(table=table, metrics={
        "train": splits.count("train"), "heldout": splits.count("heldout"),
        "moved": sum(old != new for old, new in zip(before, splits, strict=True)),
    })
