"""The labeler registry of the ``label`` stage: what a labeler receives and returns, and where each
built-in one lives.

A labeler is a plain function ``label(request) -> LabelBatch`` registered under a name. The
``label`` stage looks names up with :func:`find_labeler`; the built-in labelers that live in their
own modules (reference-based rewards, reward models) are named in :data:`LABELER_MODULES` and
imported on first use, so neither the stage nor those modules import each other at load time.
Adding a labeler is one call::

    register_labeler(Labeler(name="reward_model", version="1", label=score_with_reward_model,
                             settings_model=RewardModelSettings, needs=frozenset({"model"})))

after which ``label: {labeler: reward_model, settings: {...}}`` selects it (a module outside the
project registers its labelers when the user imports it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import BaseModel

from prefloop.errors import UserError

if TYPE_CHECKING:
    from prefloop.stage import StageContext


@dataclass(frozen=True)
class LabelRequest:
    """What a labeler gets: the samples (checked against the samples schema), the prompts when the
    stage has them, the stage config, its parsed ``settings`` and the stage context (``ctx.model_dir
    ("model")`` for a model input, ``ctx.progress`` for long work)."""

    samples: pa.Table
    prompts: pa.Table | None
    config: Any  # the label stage's LabelingConfig
    settings: BaseModel | None
    ctx: StageContext


@dataclass
class LabelBatch:
    """What a labeler returns: one entry per label, and the sample rows it could not label."""

    target_ids: list[str] = field(default_factory=list)
    prompt_ids: list[str | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)
    extracted: list[str | None] = field(default_factory=list)
    target_kind: Literal["sample", "pair"] = "sample"
    dropped: list[tuple[int, str, str]] = field(default_factory=list)  # (sample row index, reason, detail)
    metrics: dict[str, Any] = field(default_factory=dict)

    def add(self, target_id: str, prompt_id: str | None, score: float, verdict: str | None = None,
            extracted: str | None = None) -> None:
        self.target_ids.append(target_id)
        self.prompt_ids.append(prompt_id)
        self.scores.append(float(score))
        self.verdicts.append(verdict)
        self.extracted.append(extracted)

    def drop(self, row_index: int, reason: str, detail: str) -> None:
        self.dropped.append((row_index, reason, detail))


@dataclass(frozen=True)
class Labeler:
    name: str
    version: str
    label: Callable[[LabelRequest], LabelBatch]
    settings_model: type[BaseModel] | None = None
    needs: frozenset[str] = frozenset()  # input roles it cannot work without ("prompts", "model")
    description: str = ""


LABELERS: dict[str, Labeler] = {}

# Built-in labelers kept in modules of their own: imported (and so registered) when first asked for.
LABELER_MODULES: dict[str, str] = {
    "bleu": "prefloop.tasks.reference_reward",
    "chrf": "prefloop.tasks.reference_reward",
    "reward_model": "prefloop.tasks.reward_model_labeler",
}


def register_labeler(labeler: Labeler, *aliases: str) -> Labeler:
    """Make ``labeler`` selectable as ``label: {labeler: NAME}`` (and under each alias)."""
    for name in (labeler.name, *aliases):
        existing = LABELERS.get(name)
        if existing is not None and existing is not labeler:
            raise UserError(f"a labeler named '{name}' is already registered ({existing.description or existing.label})")
        LABELERS[name] = labeler
    return labeler


def find_labeler(name: str) -> Labeler | None:
    """The labeler registered as ``name`` (importing the built-in module that registers it), or None."""
    if name not in LABELERS and name in LABELER_MODULES:
        importlib.import_module(LABELER_MODULES[name])
    return LABELERS.get(name)


def labeler_names() -> list[str]:
    """Every selectable labeler name: the registered ones and the built-ins not imported yet."""
    return sorted(set(LABELERS) | set(LABELER_MODULES))
