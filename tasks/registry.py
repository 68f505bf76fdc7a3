"""Every stage by name, for the CLI and the flows."""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_MODULES = {
    "prompts": "prefloop.tasks.prompts",
    "sft": "prefloop.tasks.training.sft",
    "sample": "prefloop.tasks.sampling",
    "label": "prefloop.tasks.labeling",
    "construct": "prefloop.tasks.construct",
    "mcts": "prefloop.tasks.mcts",
    "pair-trees": "prefloop.tasks.pair_trees",
    "filter": "prefloop.tasks.filtering",
    "reference": "prefloop.tasks.training.reference",
    "train": "prefloop.tasks.training.preference",
    "evaluate": "prefloop.tasks.evaluation",
    "train-rm": "prefloop.tasks.reward_model",
    "label-rm": "prefloop.tasks.reward_labels",
    "label-judge": "prefloop.tasks.judge",
}

# The section of a loop config (configs/*.yaml) that configures each stage.
CONFIG_SECTIONS = {
    "prompts": "prompts",
    "sft": "sft",
    "sample": "sampling",
    "label": "label",
    "construct": "construction",
    "mcts": "mcts",  # used when construction.method is mcts: mcts -> pair-trees replaces sample -> label -> construct
    "pair-trees": "pair_trees",
    "filter": "filter",
    "reference": "reference",  # no loop-config section: the flow derives it from train (defaults on the CLI)
    "train": "train",
    "evaluate": "evaluation",
    "train-rm": "reward_model",
    "label-rm": "reward_labels",
    "label-judge": "judge",
}


def stage_module(name: str) -> ModuleType:
    if name not in STAGE_MODULES:
        raise KeyError(f"no stage named '{name}'; stages: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])
