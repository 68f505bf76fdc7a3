"""Stage ``prompts``: the embedded default task's prompt sets (train and held-out splits).

Problems come from :mod:`prefloop.embedded.arithmetic`; held-out prompts are disjoint from
training prompts by construction. Each row keeps the reference answer (for verifiers) and the
gold step-by-step solution (for the SFT warm start).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PROMPTS
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, make_problems
from prefloop.ids import content_id
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, execute
from prefloop.storage import ArtifactRef, ArtifactStore

TASK_NAME = "arithmetic"


class PromptsConfig(StageConfig):
    task: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig, description="difficulty of the problems")
    n_train: int = Field(2048, ge=0, description="training prompts")
    n_heldout: int = Field(1000, ge=0, description="held-out prompts, never trained on")
    seed: int = 0


SPEC = StageSpec(
    name="prompts",
    version="1",
    config_model=PromptsConfig,
    output_kind="prompts",
    inputs={},
    output_table=PROMPTS,
    description="Generate the embedded arithmetic task's train and held-out prompts.",
)


def compute(ctx: StageContext) -> StageOutput:
    config: PromptsConfig = ctx.config
    rows: dict[str, list] = {name: [] for name in ("prompt_id", "prompt", "reference_answer", "reference_solution", "split")}
    for split, n in (("train", config.n_train), ("heldout", config.n_heldout)):
        for problem in make_problems(n, config.seed, config.task, split):
            rows["prompt_id"].append(content_id(TASK_NAME, problem.prompt))
            rows["prompt"].append(problem.prompt)
            rows["reference_answer"].append(problem.answer)
            rows["reference_solution"].append(problem.solution)
            rows["split"].append(split)
    table = pa.table(rows)
    table = table.append_column("task", pa.array([TASK_NAME] * table.num_rows, pa.string()))
    table = table.append_column("source", pa.array([f"prefloop.embedded.arithmetic/seed={config.seed}"] * table.num_rows))
    return StageOutput(table=table, metrics={"train": config.n_train, "heldout": config.n_heldout})


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
