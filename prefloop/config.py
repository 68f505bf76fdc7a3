"""The loop config: one typed, frozen model per file in ``configs/``, with a section per stage.

The same model is the Prefect flow's parameter (the UI renders it as a form) and the YAML file's
schema; unknown keys are errors, so a typo cannot silently fall back to a default.

Where a run starts is loop-level (:class:`LoopSettings`): by default the embedded arithmetic task
(sections ``sft_prompts``, ``prompts``) and an SFT-trained tiny Llama (section ``sft``); with
``policy`` a user's model, with ``demonstrations`` SFT of that model first, with ``prompt_source``
(and ``prompt_split``) a user's prompts. The stage sections keep their meaning either way.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from prefloop.errors import UserError
from prefloop.tasks.common.iteration import ReferencePolicy
from prefloop.tasks.importing.stage import ImportSource
from prefloop.tasks.registry import STAGES, ConfigSection, StageEntry
from prefloop.tasks.split_prompts import SplitPromptsConfig
from prefloop.tasks.training.configs import check_iteration_policy


class LoopSettings(BaseModel):
    """The loop's own settings; the stage sections are added from the stage registry (:data:`LoopConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("demo", description="run name: refs are written under NAME/ (e.g. demo/round-1/preferences)")
    rounds: int = Field(3, ge=0, le=100)
    seed: int = Field(0, description="added to every stage's seed, so one number reseeds the whole run")
    reference_policy: ReferencePolicy = Field(
        "fixed", description="fixed: the SFT model is the DPO reference in every round; previous_round: the policy "
        "that started the round; mixture: INPO's geometric mixture of both (train.mixture_weight = τ/η on SFT; needs "
        "loss ipo with ipo_tau = η); soft_sync: "
        "TR-DPO, the start policy moved toward the trained one every train.sync_every steps by train.sync_alpha"
    )

    policy: str | None = Field(
        None, description="the starting policy instead of the embedded SFT model: a model ref (mine/policy), kind/id "
        "or id prefix in the store, or a local save_pretrained directory with safetensors weights (imported by stage "
        "import-model, so its id is its content). Round 0 evaluates it; the sft section is then unused unless "
        "demonstrations are given")
    demonstrations: str | None = Field(
        None, description="with policy: SFT the starting policy before round 1 (section sft's training settings) on "
        "a preferences artifact's chosen responses or a samples artifact's completions (a ref, e.g. from "
        "'prefloop import preferences FILE')")
    prompt_source: str | ImportSource | None = Field(
        None, description="the user's prompts instead of the embedded task's (section prompts unused): a prompts "
        "artifact ref, or an import spec {source, map: {prompt: FIELD, reference_answer: FIELD}, …} read by stage "
        "import-prompts with the mapping language of 'prefloop import'")
    prompt_split: SplitPromptsConfig | None = Field(
        None, description="with prompt_source: rewrite its train/held-out split by prompt hash (stage split-prompts): "
        "{heldout_size: N} or {heldout_fraction: f}, optional seed; unset keeps the source's own split")

    @model_validator(mode="after")
    def _starting_points_agree(self) -> LoopSettings:
        if self.demonstrations is not None and self.policy is None:
            raise UserError("demonstrations SFT a starting policy: set policy too (a model ref or a save_pretrained "
                             "directory); the embedded model trains on the sft_prompts section's gold solutions")
        if self.prompt_split is not None and self.prompt_source is None:
            raise UserError("prompt_split splits a prompt_source; the embedded prompts are split by their section "
                             "(prompts.n_heldout)")
        evaluation = getattr(self, "evaluation", None)
        for section in ("sampling", "mcts"):
            stage = getattr(self, section, None)
            if stage is not None and evaluation is not None and stage.split == evaluation.split:
                raise UserError(f"{section}.split and evaluation.split are both '{stage.split}': the held-out prompts "
                                 "would be trained on; sample from 'train' and evaluate on 'heldout'")
        return self

    @model_validator(mode="after")
    def _iteration_policy_fits_the_loss(self) -> LoopSettings:
        """The loop's reference_policy (the one every round's train stage gets) must be defined for the loss:
        mixture only with ipo (INPO), sppo only with previous_round (``check_iteration_policy``)."""
        train = getattr(self, "train", None)
        if train is not None:
            check_iteration_policy(self.reference_policy, train.training.loss)
        return self

    @model_validator(mode="after")
    def _evaluate_with_the_label_task(self) -> LoopSettings:
        """Evaluation checks answers the way the label stage does, unless the config sets its own task."""
        evaluation, label = getattr(self, "evaluation", None), getattr(self, "label", None)
        if evaluation is None or label is None:
            return self
        if "task" in evaluation.model_fields_set or evaluation.task == label.task:
            return self
        return self.model_copy(update={"evaluation": evaluation.model_copy(update={"task": label.task})})


def _load(path: str) -> type[BaseModel]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _section_field(entry: StageEntry, section: ConfigSection) -> tuple[Any, Any]:
    config_model = entry.spec.config_model
    annotation = config_model
    for alternative in section.alternatives:
        annotation = annotation | _load(alternative)
    description = section.description or f"stage '{entry.name}': {entry.spec.description}"
    return annotation, Field(default_factory=config_model, description=description)


def _loop_config() -> type[LoopSettings]:
    fields = {section.field: _section_field(entry, section)
              for entry in STAGES.values() for section in entry.sections}
    model = create_model("LoopConfig", __base__=LoopSettings, __module__=__name__, **fields)
    model.__doc__ = ("Everything a multi-round run needs: a starting policy (the SFT warm start, or ``policy``), then "
                     "``rounds`` rounds of sample → label → "
                     "construct → filter → train → evaluate, each round's policy feeding the next. Stage sections "
                     f"({', '.join(fields)}) come from the stage registry.")
    return model


LoopConfig = _loop_config()
"""The loop config: the loop's settings plus one section per stage section the registry names."""


class ConfigFileError(ValueError):
    pass


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigFileError(f"config file {path} does not exist (configs shipped with prefloop are in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_loop_config(path: str | Path, **overrides: Any) -> LoopConfig:
    """The loop config in ``path``; top-level ``overrides`` that are not None replace the file's values
    (the CLI's ``--rounds``, ``--name``, ``--policy REF_OR_DIR``)."""
    data = read_yaml(path) | {k: v for k, v in overrides.items() if v is not None}
    try:
        return LoopConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigFileError(f"{path} is not a valid loop config:\n{error}") from None
