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
from prefloop.tasks.common.ensembles import Aggregation
from prefloop.tasks.common.iteration import ReferencePolicy
from prefloop.tasks.importing.stage import ImportSource
from prefloop.tasks.registry import STAGES, ConfigSection, StageEntry
from prefloop.tasks.split_prompts import SplitPromptsConfig
from prefloop.tasks.training.configs import RewardModelTrainingConfig, check_iteration_policy

# Filter keys that read an ensemble's member labels (the filter's ensemble_labels input).
ENSEMBLE_FILTER_KEYS = ("strong_negative_strength", "ambiguous_strength", "max_ensemble_std")


def ensemble_filter_keys(filtering: Any) -> list[str]:
    """The filter settings in use that need an ensemble's member labels: the thresholds of
    :data:`ENSEMBLE_FILTER_KEYS` that are set, and ``pair_flip_posterior`` when on."""
    keys = [key for key in ENSEMBLE_FILTER_KEYS if getattr(filtering, key, None) is not None]
    return keys + (["pair_flip_posterior"] if getattr(filtering, "pair_flip_posterior", False) else [])


class RewardModelSetting(BaseModel):
    """The loop setting ``reward_model``: the rounds are labeled by a reward model (stage ``label-rm``)
    instead of the label section's labeler.

    Either ``model`` — a reward model the user brings: a model ref (e.g. from ``prefloop import model
    DIR``), kind/id, or a save_pretrained directory of a one-label sequence classifier, imported on the
    fly by stage ``import-model`` — or ``preferences`` — pairs the user imported, from which stage
    ``train-rm`` trains ``members`` Bradley–Terry reward models (seeds ``seed`` … ``seed + members − 1``)
    before round 1, each initialised from the starting policy (so it reads the policy's tokens).

    An ensemble's score is ``aggregate`` of its members' rewards, each member first standardised on the
    reference set ``train-rm`` stored (:mod:`prefloop.tasks.common.ensembles`): ``mean`` z̄, ``min``
    min_i z_i (worst case), ``uncertainty_weighted`` z̄ − λ·var_i z_i with λ = ``uncertainty_weight``
    (Coste et al. 2023). Construction ranks samples by that score; the filter gets the members' own
    labels as its ``ensemble_labels`` input (disagreement, flip-rate estimate); the evaluation reports the
    mean reward under the same aggregate (``evaluation.reward_aggregation``/``uncertainty_penalty``) and judges
    win rates by reward (``evaluation.win_judge``), unless its section sets them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="a reward model: a model ref, kind/id or a save_pretrained directory (one-label sequence "
        "classifier, safetensors; imported by stage import-model); a train-rm ensemble in the store works too")
    preferences: str | ImportSource | None = Field(
        None, description="train the reward model (stage train-rm) before round 1 on these pairs: a preferences "
        "ref, or an import spec {source, map: {prompt: F, chosen: F, rejected: F}} read by stage import-preferences")
    members: int = Field(1, ge=1, le=16, description="with preferences: ensemble size k (member i uses seed + i)")
    aggregate: Aggregation = Field("mean", description="how an ensemble's standardised member rewards become one "
                                   "score: mean, min (worst case) or uncertainty_weighted (mean − λ·variance)")
    uncertainty_weight: float = Field(0.5, ge=0.0, description="λ of aggregate uncertainty_weighted")
    training: RewardModelTrainingConfig = Field(
        default_factory=RewardModelTrainingConfig, description="with preferences: train-rm's training settings")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="with preferences: share of prompts held out "
                                    "for the reward model's accuracy and its members' standardisation")
    seed: int = Field(0, description="with preferences: seed of member 0 (the loop seed is added)")
    batch_size: int = Field(64, ge=1, description="scoring batch size of stage label-rm")

    @model_validator(mode="after")
    def _one_source(self) -> RewardModelSetting:
        if (self.model is None) == (self.preferences is None):
            raise UserError("reward_model needs exactly one source: {model: REF_OR_DIR} to label with a reward model "
                             "you have, or {preferences: REF_OR_IMPORT_SPEC, members: k} to train one (train-rm) "
                             "before round 1")
        training_keys = sorted({"members", "training", "heldout_fraction", "seed"} & self.model_fields_set)
        if self.model is not None and training_keys:
            raise UserError(f"reward_model: {', '.join(training_keys)} configure training a reward model from "
                             "preferences, but model is given (it is used as it is): remove them, or give "
                             "preferences instead of model")
        return self

    def train_config(self, loop_seed: int) -> dict[str, Any]:
        """Stage ``train-rm``'s config (the loop seed folded into the members' seeds)."""
        return {"training": self.training.model_dump(), "ensemble_size": self.members,
                "seed": self.seed + loop_seed, "heldout_fraction": self.heldout_fraction,
                "aggregation": self.aggregate, "uncertainty_penalty": self.uncertainty_weight,
                "batch_size": self.batch_size}

    def label_config(self) -> dict[str, Any]:
        """Stage ``label-rm``'s config: members plus the aggregate (an ensemble's; a single model ignores it)."""
        return {"aggregation": self.aggregate, "uncertainty_penalty": self.uncertainty_weight,
                "batch_size": self.batch_size}


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
    reward_model: RewardModelSetting | None = Field(
        None, description="label the rounds with a reward model instead of the label section's labeler: {model: "
        "REF_OR_DIR} or {preferences: REF_OR_IMPORT_SPEC, members: k, aggregate: mean|min|uncertainty_weighted, "
        "uncertainty_weight: λ} (train-rm before round 1); evaluation then reports its mean reward")

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
    def _reward_model_labels_the_rounds(self) -> LoopSettings:
        """Who labels the rounds must be said once: reward_model, or the label section's labeler; the filter's
        ensemble rules need an ensemble's member labels."""
        label, construction, filtering = (getattr(self, name, None) for name in ("label", "construction", "filter"))
        setting = self.reward_model
        if label is not None:
            default = type(label).model_fields["labeler"].default
            if setting is None and label.labeler == "reward_model":
                raise UserError("label.labeler is reward_model but the loop has no reward model: set the loop setting "
                                 "reward_model: {model: REF_OR_DIR} (or {preferences: REF, members: k} to train one) "
                                 "and leave label.labeler unset")
            if setting is not None and label.labeler not in (default, "reward_model"):
                raise UserError(f"label.labeler is '{label.labeler}' but reward_model is set too: the rounds are "
                                 "labeled by one of them; remove reward_model to label with the labeler, or "
                                 "label.labeler to label with the reward model")
        if setting is not None and construction is not None and construction.method == "mcts":
            raise UserError("construction method mcts scores tree nodes by the verifier and the policy's "
                             "self-evaluation, not by a label stage: remove reward_model, or use best_vs_worst")
        if filtering is not None:
            keys = ensemble_filter_keys(filtering)
            if keys and setting is None:
                raise UserError(f"filter.{', filter.'.join(keys)} read a reward-model ensemble's member labels, "
                                 "but the loop has none: set reward_model: {preferences: REF, members: 3} (or an "
                                 "ensemble model), or unset them")
            if keys and setting is not None and setting.preferences is not None and setting.members < 2:
                raise UserError(f"filter.{', filter.'.join(keys)} compare an ensemble's members, but reward_model "
                                 "trains one model: set reward_model.members to 2 or more, or unset them")
        return self

    @model_validator(mode="after")
    def _cream_ranks_samples(self) -> LoopSettings:
        """CREAM's consistency (filter.consistency_confidence) ranks each prompt's sampled responses by two
        rounds' policy rewards (stage label-policy); tree search makes step-level pairs, not samples."""
        construction, filtering = getattr(self, "construction", None), getattr(self, "filter", None)
        if getattr(filtering, "consistency_confidence", False) and getattr(construction, "method", None) == "mcts":
            raise UserError("filter.consistency_confidence (CREAM) ranks each prompt's sampled responses by this and "
                             "the previous round's policy, but construction method mcts builds its pairs from the "
                             "steps of search trees, not from samples, so there is nothing for both rounds to rank "
                             "(MCTS pairs carry their own confidence, from visit counts): turn "
                             "consistency_confidence off, or construct pairs from samples (best_vs_worst)")
        return self

    @model_validator(mode="after")
    def _judge_wins_by_the_reward_model(self) -> LoopSettings:
        """With a labeling reward model the evaluation judges wins by its reward, and scores an ensemble with the
        aggregate the rounds are labeled by (reward_model.aggregate, uncertainty_weight), unless the evaluation
        section sets its own."""
        evaluation = getattr(self, "evaluation", None)
        if self.reward_model is None or evaluation is None:
            return self
        wanted = {"win_judge": "reward_model", "reward_aggregation": self.reward_model.aggregate,
                  "uncertainty_penalty": self.reward_model.uncertainty_weight}
        update = {key: value for key, value in wanted.items() if key not in evaluation.model_fields_set}
        if not update:
            return self
        return self.model_copy(update={"evaluation": evaluation.model_copy(update=update)})

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
