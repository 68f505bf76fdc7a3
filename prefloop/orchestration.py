"""Thin Prefect wrappers around stage cores.

A stage task takes only small, serialisable things — input references, a config mapping and the
store's URI — and returns a :class:`~prefloop.stage.StageResult`; tables never travel through
Prefect. Identity lives in the store (the output id is computed before any work), so a rerun is a
lookup whatever Prefect's own state; Prefect's result cache is therefore switched off here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefloop.stage import StageResult, StageSpec
from prefloop.storage import ArtifactStore

RunFunction = Callable[..., StageResult]


def stage_task(spec: StageSpec, run: RunFunction, retries: int = 0):
    """A Prefect task named after the stage that calls its pure ``run``."""

    @task(name=spec.name, description=spec.description, cache_policy=NO_CACHE, persist_result=False,
          retries=retries, retry_delay_seconds=[5, 30, 120][:retries] or 0)
    def stage(inputs: Mapping[str, str], config: Mapping[str, Any] | None, store: str,
              name: str | None = None) -> StageResult:
        result = run(dict(inputs), config, ArtifactStore(store), name)
        logger = get_run_logger()
        status = "cached" if result.cached else f"computed in {result.seconds:.1f}s"
        logger.info("%s -> %s (%s, %d rows%s)", spec.name, name or result.output, status, result.rows,
                    f", dropped {sum(result.drops.values())}" if result.drops else "")
        return result

    return stage
