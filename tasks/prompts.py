"""Stage ``prompts``: the embedded default task's prompt sets (train and held-out splits).

Problems come from :mod:`prefloop.embedded.arithmetic`; held-out prompts are disjoint from
training prompts by construction. Each row keeps the reference answer (for verifiers) and the
gold step-by-step solution (for the SFT warm start).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from prefloop.datasets_spec import PROMPTS
from prefloop.embedded.arithmetic import ArithmeticTaskConfig, Problem, make_problems
from prefloop.ids import content_id
from prefloop.stage import StageConfig, StageContext, StageOutput
from prefloop.tasks.registry import stage_spec

TASK_NAME = "arithmetic"


class PromptSet(StageConfig):
    """A further set of problems mixed into the artifact (e.g. a few hard problems in SFT data)."""

    task: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig)
    n_train: int = Field(0, ge=0)
    n_heldout: int = Field(0, ge=0)


class PromptsConfig(StageConfig):
    task: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig, description="difficulty of the problems")
    n_train: int = Field(2048, ge=0, description="training prompts")
    n_heldout: int = Field(1000, ge=0, description="held-out prompts, never trained on")
    mix_in: list[PromptSet] = Field(default_factory=list, description="further problem sets of other difficulty")
    seed: int = 0


SPEC = stage_spec(
    "prompts",
    version="1",
    config_model=PromptsConfig,
    output_table=PROMPTS,
    description="Generate the embedded arithmetic task's train and held-out prompts.",
)


def _append(rows: dict[str, list], problem: Problem, split: str) -> None:
    rows["prompt_id"].append(content_id(TASK_NAME, problem.prompt))
    rows["prompt"].append(problem.prompt)
    rows["reference_answer"].append(problem.answer)
    rows["reference_solution"].append(problem.solution)
    rows["split"].append(split)


def compute(ctx: StageContext) -> StageOutput:
    config: PromptsConfig = ctx.config
    rows: dict[str, list] = {name: [] for name in ("prompt_id", "prompt", "reference_answer", "reference_solution", "split")}
    seen: set[str] = set()
    sets = [PromptSet(task=config.task, n_train=config.n_train, n_heldout=config.n_heldout), *config.mix_in]
    for index, part in enumerate(sets):
        for split, n in (("train", part.n_train), ("heldout", part.n_heldout)):
            # Each set draws from its own random stream; a prompt two sets share is kept once.
            for problem in make_problems(n, config.seed + 7919 * index, part.task, split):
                if problem.prompt in seen:
                    continue
                seen.add(problem.prompt)
                _append(rows, problem, split)
    table = pa.table(rows)
    table = table.append_column("task", pa.array([TASK_NAME] * table.num_rows, pa.string()))
    table = table.append_column("source", pa.array([f"prefloop.embedded.arithmetic/seed={config.seed}"] * table.num_rows))
    splits = table.column("split").to_pylist()
    return StageOutput(table=table, metrics={"train": splits.count("train"), "heldout": splits.count("heldout")})
