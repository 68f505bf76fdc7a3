"""Stage ``train``: one round of preference optimisation (DPO and its family) on a pairs artifact.

Inputs: the filtered ``preferences``, the ``policy`` to start from and the frozen ``reference``.
Which model the flow passes as the reference is explicit config (``reference_policy``) and is
recorded in the manifest: ``fixed`` keeps the SFT model in every round (MCTS-DPO), while
``previous_round`` uses the policy that started this round (iterative DPO, SPIN).
The output is a new model artifact plus the per-step training log.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prefloop.datasets_spec import PREFERENCES, TRAIN_LOG
from prefloop.orchestration import stage_task
from prefloop.stage import StageConfig, StageContext, StageOutput, StageSpec, done_total_callback, execute
from prefloop.storage import ArtifactRef, ArtifactStore
from prefloop.tasks.training.artifacts import load_policy, save_model_dir, summarize, train_log_table
from prefloop.tasks.training.loop import DPOConfig, train_dpo


class TrainConfig(StageConfig):
    training: DPOConfig = Field(default_factory=DPOConfig)
    reference_policy: Literal["fixed", "previous_round"] = Field(
        "fixed", description="which model the flow passes as 'reference' (recorded for lineage)"
    )
    round: int = Field(1, ge=0)


SPEC = StageSpec(
    name="train",
    version="1",
    config_model=TrainConfig,
    output_kind="model",
    pool="gpu",
    inputs={"preferences": "preferences", "policy": "model", "reference": "model"},
    description="Preference optimisation (DPO family) of the policy against a frozen reference.",
)


def compute(ctx: StageContext) -> StageOutput:
    config: TrainConfig = ctx.config
    pairs_table = ctx.read("preferences", PREFERENCES)
    if pairs_table.num_rows == 0:
        raise ValueError(
            f"preferences {ctx.inputs['preferences']} is empty: there is nothing to train on. "
            "Sample more prompts or completions per prompt, or relax the filter."
        )
    pairs = list(zip(pairs_table.column("prompt").to_pylist(), pairs_table.column("chosen").to_pylist(),
                     pairs_table.column("rejected").to_pylist(), strict=True))
    policy, tokenizer = load_policy(ctx.model_dir("policy"))
    reference, _ = load_policy(ctx.model_dir("reference"))
    steps_hint = config.training.max_steps or max(1, int(len(pairs) * config.training.epochs) // config.training.batch_size)
    with ctx.progress(steps_hint, "steps") as advance:
        steps = train_dpo(policy, reference, tokenizer, pairs, config.training, progress=done_total_callback(advance))
    return StageOutput(
        files_dir=save_model_dir(policy, tokenizer),
        extra_tables={"train_log": (train_log_table(steps), TRAIN_LOG)},
        metrics={"pairs": len(pairs), **summarize(steps)},
    )


def run(inputs: dict[str, ArtifactRef | str], config, store: ArtifactStore, name: str | None = None):
    return execute(SPEC, compute, inputs, config, store, name)


# The Prefect task of this stage (flows call it; the pure core above needs no Prefect).
prefect_task = stage_task(SPEC, run)
