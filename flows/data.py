"""The data-only flow: build a preference set from other models' completions — no training, no GPU.

    import prompts ─┐
    import samples ─┴─► label ─► construct ─► filter ─► export (TRL-ready prompt/chosen/rejected)

The way a data team works: completions of several policies per prompt (each row tagged with its
policy name) are imported, checked against the prompts' reference answers by a task definition
(e.g. ``\\boxed{}`` + math-verify), paired best against worst and filtered; every stage is a
versioned artifact, every dropped row is in a drops table with its reason, and a rerun is a series
of store lookups. :func:`run_data` calls the stage cores directly; :func:`data_flow` is the same
wiring as a Prefect flow (each stage a task, visible in the UI).

Prompts and samples are either refs of artifacts imported before (``prefloop import …``) or
import specs in the config (``samples: {source: completions.jsonl, map: {completion: output}}``).

With ``reward_model: {model: REF_OR_DIR, aggregate: …}`` a reward model labels the samples instead
(stage ``label-rm``, the loop's labeling path :func:`prefloop.flows.training.label_with_reward_model`):
pairs are built by its reward (an ensemble's aggregate of standardised members) and an ensemble's
member labels are the filter's ``ensemble_labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefloop.config import ConfigFileError, RewardModelSetting, read_yaml
from prefloop.errors import UserError
from prefloop.flows.loop import direct_caller, prefect_caller
from prefloop.flows.training import label_with_reward_model, labeling_reward_model
from prefloop.orchestration import call_stage_task, wait_for_artifacts
from prefloop.stage import StageCaller, StageResult
from prefloop.storage import DEFAULT_STORE, ArtifactStore
from prefloop.tasks.construct import ConstructConfig
from prefloop.tasks.filtering.stage import FilterConfig
from prefloop.tasks.importing.stage import ImportSource, import_table
from prefloop.tasks.labeling import LabelingConfig


class ExportSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["trl", "jsonl", "parquet"] = Field("trl", description="trl: prompt/chosen/rejected Parquet")
    out: str | None = Field(None, description="directory to export the filtered preferences to (None: no export)")


class DataConfig(BaseModel):
    """A data-only run: import (or reuse) prompts and samples, label, construct, filter, export."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("data", description="run name: refs are written under NAME/ (e.g. data/preferences)")
    prompts: str | ImportSource | None = Field(
        None, description="ref of a prompts artifact, or an import spec {source, map, …}; the verifier needs it")
    samples: str | ImportSource | None = Field(None, description="ref of a samples artifact, or an import spec")
    label: LabelingConfig = Field(default_factory=lambda: LabelingConfig(labeler="verifier", task="math"))
    reward_model: RewardModelSetting | None = Field(
        None, description="label with a reward model instead of the label section (stage label-rm): {model: "
        "REF_OR_DIR, aggregate: mean|min|uncertainty_weighted, uncertainty_weight: λ}")
    construction: ConstructConfig = Field(default_factory=ConstructConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    export: ExportSettings = Field(default_factory=ExportSettings)

    @model_validator(mode="after")
    def _a_reward_model_to_label_with(self) -> DataConfig:
        if self.reward_model is not None and self.reward_model.model is None:
            raise UserError("the data-only flow labels with a reward model you have (reward_model: {model: REF}); it "
                             "has no policy to initialise one from: train it first with 'prefloop stage train-rm "
                             "--input preferences=REF', or run the loop with reward_model: {preferences: REF}")
        return self


def load_data_config(path: str | Path, **overrides: Any) -> DataConfig:
    data = read_yaml(path) | {k: v for k, v in overrides.items() if v is not None}
    try:
        return DataConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigFileError(f"{path} is not a valid data-only config:\n{error}") from None


class DataSummary(BaseModel):
    name: str
    store: str
    preferences: str
    stages: list[StageResult]
    export_path: str | None = None


# (kind, import spec, store URI, ref name) -> the import's result; direct or as a Prefect task.
ImportCaller = Callable[[str, ImportSource, str, str], StageResult]


def direct_import(kind: str, spec: ImportSource, store: str, name: str) -> StageResult:
    return import_table(kind, spec.source, ArtifactStore(store), spec.map, spec.dataset_split, spec.split,
                        spec.policy_name, name, spec.explode)


def prefect_import(kind: str, spec: ImportSource, store: str, name: str) -> StageResult:
    return call_stage_task(f"import-{kind}", {}, spec.task_config(), store, name)


def _artifact(kind: str, given: str | ImportSource | None, store: str, name: str, importer: ImportCaller,
              stages: list[StageResult]) -> str | None:
    if given is None:
        return None
    if isinstance(given, ImportSource):
        result = importer(kind, given, store, name)
        stages.append(result)
        return result.output
    target = ArtifactStore(store)
    ref = target.resolve(given)
    if ref.kind != kind:
        raise UserError(f"'{given}' is a {ref.kind} artifact ({ref}), but the data-only flow's {kind} must be a {kind} "
                         f"artifact: import it with 'prefloop import {kind} FILE'")
    target.set_ref(name, ref, note=f"data-only run input ({given})")
    return str(ref)


def run_data(config: DataConfig, store: str = DEFAULT_STORE, prompts: str | None = None, samples: str | None = None,
             out: str | None = None, call: StageCaller = direct_caller,
             importer: ImportCaller = direct_import) -> DataSummary:
    """Import (or look up) prompts and samples, then label → construct → filter, and export the kept pairs.

    ``prompts``/``samples``/``out`` override the config's (refs, and an export directory).
    """
    store = ArtifactStore(store).uri
    name = config.name
    stages: list[StageResult] = []
    samples_ref = _artifact("samples", samples or config.samples, store, f"{name}/samples", importer, stages)
    prompts_ref = _artifact("prompts", prompts or config.prompts, store, f"{name}/prompts", importer, stages)
    if samples_ref is None:
        raise UserError("the data-only flow needs samples: give --samples REF (from 'prefloop import samples FILE') "
                         "or a 'samples: {source: FILE, map: {...}}' section in the config")
    construction = config.construction.model_dump()
    filter_inputs: dict[str, str] = {}
    if config.reward_model is None:
        label_inputs = {"samples": samples_ref} | ({"prompts": prompts_ref} if prompts_ref else {})
        labels = call("label", label_inputs, config.label.model_dump(), store, f"{name}/labels")
    else:
        reward_model, reward_stages = labeling_reward_model(call, config.reward_model, None, 0, name, store)
        stages += reward_stages
        scored = label_with_reward_model(call, reward_model, samples_ref, config.reward_model.label_config(), store,
                                         f"{name}/labels")
        labels = scored.result
        construction["labeler"] = construction["labeler"] or scored.scorer
        if scored.ensemble_labels is not None:
            filter_inputs["ensemble_labels"] = scored.ensemble_labels
    pairs = call("construct", {"samples": samples_ref, "labels": labels.output}, construction, store,
                 f"{name}/preferences")
    kept = call("filter", {"preferences": pairs.output, **filter_inputs}, config.filter.model_dump(), store,
                f"{name}/preferences-filtered")
    stages += [labels, pairs, kept]
    export_dir = out or config.export.out
    path = None
    if export_dir:
        from prefloop.datasets_spec.exporters import export_artifact

        target = ArtifactStore(store)
        # A rerun of the flow replaces its own earlier export there (never other files: see export_artifact).
        path = str(export_artifact(target, target.resolve(kept.output), export_dir, config.export.format, force=True))
    return DataSummary(name=name, store=store, preferences=kept.output, stages=stages, export_path=path)


@flow(name="prefloop-data", log_prints=True)
def data_flow(config: DataConfig, store: str = DEFAULT_STORE, prompts: str | None = None, samples: str | None = None,
              out: str | None = None) -> DataSummary:
    """The data-only flow as a Prefect flow: imports and stages are tasks; see :func:`run_data`."""
    try:
        return run_data(config, store, prompts, samples, out, call=prefect_caller, importer=prefect_import)
    finally:
        wait_for_artifacts()

