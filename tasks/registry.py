"""The one list of stages: everything else is derived from it or checked against it.

Each :class:`StageEntry` names a stage, the module that holds its pure core (config model, ``SPEC``,
``compute``), the artifact kinds it reads and writes, the loop-config sections that configure it,
the Prefect work pool that runs it and how often Prefect retries it. From this list come

- every stage's :class:`~prefloop.stage.StageSpec` (a stage module builds its ``SPEC`` with
  :func:`stage_spec`, so its inputs, output kind and pool are stated here once);
- the CLI's stage choices (``prefloop stage NAME``);
- the Prefect task of each stage (:func:`prefloop.orchestration.prefect_stage_task`) and the
  per-stage flows (``flows/stages.py``), whose deployments ``prefect.yaml`` lists (a test checks it);
- the stage sections of the loop config (:class:`prefloop.config.LoopConfig`).

This module imports no stage: entries name modules by dotted path and load them on first use.

Adding a stage: write ``tasks/<name>.py`` with its config model, ``SPEC = stage_spec(...)`` and
``compute``; add an entry below; add its tests (README, "Adding a stage").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prefloop.stage import StageConfig, StageResult, StageSpec
    from prefloop.storage import ArtifactRef, ArtifactStore

Pool = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class ConfigSection:
    """A field of the loop config that configures a stage.

    ``alternatives`` names further config models (``module:Class``) the field also accepts, as a
    union told apart by the models themselves (``construction`` is a construct config, or
    ``{method: mcts}`` to build pairs by tree search instead).
    """

    field: str
    description: str = ""
    alternatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageEntry:
    name: str
    module: str
    output: str  # the artifact kind it writes
    inputs: Mapping[str, str] = field(default_factory=dict)  # role -> the artifact kind it reads
    optional_inputs: frozenset[str] = frozenset()
    sections: tuple[ConfigSection, ...] = ()
    pool: Pool = "cpu"
    retries: int = 0
    spec_attribute: str = "SPEC"
    # Deployable stages are run by 'prefloop stage NAME' and have a flow and a deployment of their
    # own; imports are stages of the data-only flow whose config names a source on the caller's disk.
    deployable: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))

    @property
    def flow_name(self) -> str:
        """The Prefect flow that runs this stage alone."""
        return f"prefloop-stage-{self.name}"

    @property
    def flow_attribute(self) -> str:
        """The name of that flow in ``flows/stages.py`` (a ``prefect.yaml`` entrypoint)."""
        return f"{self.name.replace('-', '_')}_flow"

    @property
    def deployment(self) -> str:
        return f"stage-{self.name}"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def spec(self) -> StageSpec:
        return getattr(self.load(), self.spec_attribute)

    def run(self, inputs: Mapping[str, ArtifactRef | str], config: StageConfig | Mapping[str, Any] | None,
            store: ArtifactStore, name: str | None = None) -> StageResult:
        """Run the stage's pure core, or look its output up if it already ran: no Prefect."""
        from prefloop.stage import execute

        module = self.load()
        runner = getattr(module, "execute_entry", None)
        if runner is not None:  # a stage whose compute needs more than its context (imports: a source path)
            return runner(self, inputs, config, store, name)
        return execute(self.spec, module.compute, inputs, config, store, name)


def _entries(*entries: StageEntry) -> dict[str, StageEntry]:
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    return {entry.name: entry for entry in entries}


def _import(kind: str) -> StageEntry:
    return StageEntry(f"import-{kind}", "prefloop.tasks.importing.stage", output=kind,
                      spec_attribute=f"{kind.upper()}_SPEC", deployable=False)


STAGES: dict[str, StageEntry] = _entries(
    StageEntry("prompts", "prefloop.tasks.prompts", output="prompts", sections=(
        ConfigSection("sft_prompts", "prompts whose gold solutions train the SFT model"),
        ConfigSection("prompts", "prompts sampled in rounds and held out for evaluation"))),
    # Not in the loop yet: a user's imported prompts get their held-out split here.
    StageEntry("split-prompts", "prefloop.tasks.split_prompts", output="prompts", inputs={"prompts": "prompts"}),
    StageEntry("sft", "prefloop.tasks.training.sft", output="model",
               inputs={"prompts": "prompts", "policy": "model", "demonstrations": "preferences",
                       "demonstration_samples": "samples"},
               optional_inputs=frozenset({"prompts", "policy", "demonstrations", "demonstration_samples"}),
               sections=(ConfigSection("sft"),), pool="gpu"),
    StageEntry("sample", "prefloop.tasks.sampling", output="samples",
               inputs={"policy": "model", "prompts": "prompts"},
               sections=(ConfigSection("sampling"),), pool="gpu", retries=1),
    StageEntry("label", "prefloop.tasks.labeling", output="labels",
               inputs={"samples": "samples", "prompts": "prompts", "model": "model"},
               optional_inputs=frozenset({"prompts", "model"}), sections=(ConfigSection("label"),)),
    StageEntry("construct", "prefloop.tasks.construct", output="preferences",
               inputs={"samples": "samples", "labels": "labels"}, sections=(ConfigSection(
                   "construction", "how preference pairs are built: best_vs_worst or best_vs_random from labeled "
                   "samples, or {method: mcts} — MCTS-DPO step-level pairs (sections mcts and pair_trees)",
                   alternatives=("prefloop.tasks.mcts.stage:MCTSConstruction",)),)),
    StageEntry("mcts", "prefloop.tasks.mcts.stage", output="trees", inputs={"policy": "model", "prompts": "prompts"},
               sections=(ConfigSection("mcts", "step-level tree search (construction method mcts)"),),
               pool="gpu", retries=1),
    StageEntry("pair-trees", "prefloop.tasks.pair_trees", output="preferences", inputs={"trees": "trees"},
               sections=(ConfigSection("pair_trees", "pairs from the search trees (construction method mcts)"),)),
    StageEntry("filter", "prefloop.tasks.filtering.stage", output="preferences",
               inputs={"preferences": "preferences", "eval_prompts": "prompts", "ensemble_labels": "labels",
                       "policy": "model", "consistency_labels": "labels", "previous_labels": "labels"},
               optional_inputs=frozenset({"eval_prompts", "ensemble_labels", "policy", "consistency_labels",
                                          "previous_labels"}),
               sections=(ConfigSection("filter"),)),
    # No loop section: a round derives its config from the train section (max_length, mixture weight).
    StageEntry("reference", "prefloop.tasks.training.reference", output="reference_logps",
               inputs={"preferences": "preferences", "reference": "model", "mixture_with": "model",
                       "off_policy": "preferences"},
               optional_inputs=frozenset({"mixture_with", "off_policy"}), pool="gpu"),
    StageEntry("train", "prefloop.tasks.training.preference", output="model",
               inputs={"preferences": "preferences", "policy": "model", "reference": "model",
                       "reference_logps": "reference_logps", "off_policy": "preferences"},
               optional_inputs=frozenset({"reference_logps", "off_policy"}),
               sections=(ConfigSection("train"),), pool="gpu"),
    StageEntry("evaluate", "prefloop.tasks.evaluation", output="metrics",
               inputs={"policy": "model", "prompts": "prompts", "baseline": "metrics", "previous": "metrics",
                       "preferences": "preferences", "reference": "model", "start": "model", "reward_model": "model"},
               optional_inputs=frozenset({"baseline", "previous", "preferences", "reference", "start", "reward_model"}),
               sections=(ConfigSection("evaluation"),), pool="gpu", retries=1),
    # Reward models and judges: train-rm and label-rm run in the loop when the loop setting reward_model is set
    # (flows/training.py); label-judge is not of the loop yet.
    StageEntry("train-rm", "prefloop.tasks.reward_model", output="model",
               inputs={"preferences": "preferences", "policy": "model", "heldout": "preferences"},
               optional_inputs=frozenset({"policy", "heldout"}), pool="gpu"),
    StageEntry("label-rm", "prefloop.tasks.reward_labels", output="labels",
               inputs={"reward_model": "model", "samples": "samples", "preferences": "preferences"},
               optional_inputs=frozenset({"samples", "preferences"}), pool="gpu"),
    # CREAM's rewards: run in the loop from round 2 when filter.consistency_confidence is on (flows/loop.py).
    StageEntry("label-policy", "prefloop.tasks.policy_rewards", output="labels",
               inputs={"samples": "samples", "policy": "model", "reference": "model"},
               optional_inputs=frozenset({"reference"}), sections=(ConfigSection(
                   "policy_rewards", "stage label-policy: the policies' rewards of a round's samples that CREAM's "
                   "consistency compares (filter.consistency_confidence): batch size, sharding"),), pool="gpu"),
    StageEntry("label-judge", "prefloop.tasks.judge", output="labels",
               inputs={"preferences": "preferences", "judge": "model"}, pool="gpu"),
    _import("prompts"),
    _import("samples"),
    _import("preferences"),
    _import("model"),
)


def stage_entry(name: str) -> StageEntry:
    """The registry entry of stage ``name``; an unknown name is an error that lists the stages."""
    if name not in STAGES:
        raise KeyError(f"no stage named '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]


def deployable_stages() -> list[StageEntry]:
    """The stages that 'prefloop stage' runs and that have a flow and a deployment of their own."""
    return [entry for entry in STAGES.values() if entry.deployable]


def stage_spec(name: str, *, version: str, config_model: type[StageConfig], description: str,
               output_table: Any = None, **options: Any) -> StageSpec:
    """The :class:`~prefloop.stage.StageSpec` of stage ``name``: what its module states (version, config
    model, output table, description, ``options`` such as ``after_publish``) joined with what its
    entry here states (inputs, output kind, pool)."""
    from prefloop.stage import StageSpec

    entry = stage_entry(name)
    return StageSpec(name=name, version=version, config_model=config_model, output_kind=entry.output,
                     inputs=dict(entry.inputs), output_table=output_table, optional_inputs=entry.optional_inputs,
                     description=description, pool=entry.pool, module=entry.module, **options)


def run_stage(stage: str, inputs: Mapping[str, ArtifactRef | str], config: StageConfig | Mapping[str, Any] | None,
              store: ArtifactStore, name: str | None = None) -> StageResult:
    """Run stage ``stage`` directly (no Prefect), or look its output up if it already ran."""
    return stage_entry(stage).run(inputs, config, store, name)
