"""A Prefect flow per stage, so every stage is also deployable and runnable alone.

Each takes input references (ref names or ``kind/id``), the stage's config mapping, the store URI
and an optional ref name for the output.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from prefloop.orchestration import call_stage_task, wait_for_artifacts
from prefloop.stage import StageResult
from prefloop.storage import DEFAULT_STORE
from prefloop.tasks.registry import stage_module


def _stage_flow(stage: str):
    module = stage_module(stage)

    @flow(name=f"prefloop-stage-{stage}", description=module.SPEC.description)
    def run_stage(inputs: dict[str, str], config: dict[str, Any] | None = None, store: str = DEFAULT_STORE,
                  name: str | None = None) -> StageResult:
        try:
            return call_stage_task(module.prefect_task, inputs, config or {}, store, name)
        finally:
            wait_for_artifacts()

    return run_stage


prompts_flow = _stage_flow("prompts")
sft_flow = _stage_flow("sft")
sample_flow = _stage_flow("sample")
label_flow = _stage_flow("label")
construct_flow = _stage_flow("construct")
mcts_flow = _stage_flow("mcts")
pair_trees_flow = _stage_flow("pair-trees")
filter_flow = _stage_flow("filter")
reference_flow = _stage_flow("reference")
train_flow = _stage_flow("train")
evaluate_flow = _stage_flow("evaluate")
train_rm_flow = _stage_flow("train-rm")
label_rm_flow = _stage_flow("label-rm")
label_judge_flow = _stage_flow("label-judge")

STAGE_FLOWS = {
    "prompts": prompts_flow, "sft": sft_flow, "sample": sample_flow, "label": label_flow,
    "construct": construct_flow, "mcts": mcts_flow, "pair-trees": pair_trees_flow, "filter": filter_flow,
    "reference": reference_flow, "train": train_flow, "evaluate": evaluate_flow,
    "train-rm": train_rm_flow, "label-rm": label_rm_flow, "label-judge": label_judge_flow,
}
