"""A Prefect flow per deployable stage, generated from the stage registry, so every stage is also
deployable and runnable alone.

Each flow takes input references (ref names or ``kind/id``), the stage's config mapping, the store
URI and an optional ref name for the output. The flows are module attributes named
``<stage>_flow`` (``pair_trees_flow`` for ``pair-trees``): ``prefect.yaml``'s entrypoints are
``flows/stages.py:<stage>_flow``, and a test checks that it lists exactly these.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from prefloop.orchestration import call_stage_task, wait_for_artifacts
from prefloop.stage import StageResult
from prefloop.storage import DEFAULT_STORE
from prefloop.tasks.registry import StageEntry, deployable_stages


def _stage_flow(entry: StageEntry):
    @flow(name=entry.flow_name, description=entry.spec.description)
    def run_stage(inputs: dict[str, str], config: dict[str, Any] | None = None, store: str = DEFAULT_STORE,
                  name: str | None = None) -> StageResult:
        try:
            return call_stage_task(entry.name, inputs, config or {}, store, name)
        finally:
            wait_for_artifacts()

    run_stage.__name__ = run_stage.__qualname__ = entry.flow_attribute
    return run_stage


STAGE_FLOWS = {entry.name: _stage_flow(entry) for entry in deployable_stages()}
globals().update({flow_.__name__: flow_ for flow_ in STAGE_FLOWS.values()})
