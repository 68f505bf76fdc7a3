"""The loop config: one typed, frozen model per file in ``configs/``, with a section per stage.

The same model is the Prefect flow's parameter (the UI renders it as a form) and the YAML file's
schema; unknown keys are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefloop.tasks.construct import ConstructConfig
from prefloop.tasks.evaluation import EvaluationConfig
from prefloop.tasks.filtering import FilterConfig
from prefloop.tasks.labeling import LabelingConfig
from prefloop.tasks.mcts import MCTSConfig, MCTSConstruction
from prefloop.tasks.pair_trees import PairTreesConfig
from prefloop.tasks.prompts import PromptsConfig
from prefloop.tasks.sampling import SamplingConfig
from prefloop.tasks.training.preference import ReferencePolicy, TrainConfig
from prefloop.tasks.training.sft import SFTStageConfig


class LoopConfig(BaseModel):
    """Everything a multi-round run needs: SFT warm start, then ``rounds`` rounds of
    sample → label → construct → filter → train → evaluate, each round's policy feeding the next."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("demo", description="run name: refs are written under NAME/ (e.g. demo/round-1/preferences)")
    rounds: int = Field(3, ge=0, le=100)
    seed: int = Field(0, description="added to every stage's seed, so one number reseeds the whole run")
    reference_policy: ReferencePolicy = Field(
        "fixed", description="fixed: the SFT model is the DPO reference in every round; previous_round: the policy "
        "that started the round; mixture: INPO's geometric mixture of both (train.mixture_weight on SFT); soft_sync: "
        "TR-DPO, the start policy moved toward the trained one every train.sync_every steps by train.sync_alpha"
    )
    sft_prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="prompts whose gold solutions train the SFT model")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="prompts sampled in rounds and held out for evaluation")
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    label: LabelingConfig = Field(default_factory=LabelingConfig)
    construction: ConstructConfig | MCTSConstruction = Field(
        default_factory=ConstructConfig, description="how preference pairs are built: best_vs_worst or best_vs_random "
        "from labeled samples, or {method: mcts} — MCTS-DPO step-level pairs (sections mcts and pair_trees)")
    mcts: MCTSConfig = Field(default_factory=MCTSConfig, description="step-level tree search (construction method mcts)")
    pair_trees: PairTreesConfig = Field(default_factory=PairTreesConfig,
                                        description="pairs from the search trees (construction method mcts)")
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _evaluate_with_the_label_task(self) -> LoopConfig:
        """Evaluation checks answers the way the label stage does, unless the config sets its own task."""
        if "task" in self.evaluation.model_fields_set or self.evaluation.task == self.label.task:
            return self
        return self.model_copy(update={"evaluation": self.evaluation.model_copy(update={"task": self.label.task})})


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
    data = read_yaml(path) | {k: v for k, v in overrides.items() if v is not None}
    try:
        return LoopConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigFileError(f"{path} is not a valid loop config:\n{error}") from None
